"""Tests for data.py against naive references (numpy padding + slicing, brute-force loops).

The data folders are written here directly in the on-disk format of the shared spec (so these
tests do not depend on preprocess.py). Run: python -m pytest -q tests/test_data.py
"""

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import InputError  # noqa: E402

PATCH = (16, 16, 8)


def write_case(root, case_id, image, body, label=None):
    case = Path(root) / "cases" / case_id
    case.mkdir(parents=True)
    np.save(case / "image.npy", image)
    np.save(case / "body.npy", body)
    if label is not None:
        np.save(case / "label.npy", label)
    (case / "meta.json").write_text(
        json.dumps({"format_version": 1, "case_id": case_id, "shape": list(image.shape)})
    )
    return dict(id=case_id, split="train", labelled=label is not None, shape=list(image.shape))


def write_dataset(root, cases, version=1, labels=None):
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / "dataset.json").write_text(
        json.dumps(
            {
                "format_version": version,
                "modality": "ct",
                "preset": {"name": "ct"},
                "labels": labels,
                "cases": cases,
            }
        )
    )
    return Path(root)


def blob_body(shape, rng):
    """A random ellipsoid-ish body mask with some holes."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, d) for d in shape], indexing="ij"))
    return (np.sum(grid**2, 0) < 0.8) & (rng.random(shape) < 0.8)


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("pairs")
    cases = []
    for i, shape in enumerate([(37, 53, 19), (12, 40, 5), (30, 30, 12)]):
        cases.append(
            write_case(
                root, f"case_{i}", rng.random(shape).astype(np.float16), blob_body(shape, rng)
            )
        )
    return write_dataset(root, cases)


def memmapped(tmp_path, name, array):
    np.save(tmp_path / f"{name}.npy", array)
    return np.load(tmp_path / f"{name}.npy", mmap_mode="r")


def padded_slice(array, start, size, pad=64):
    """Reference read_patch: pad with zeros, then plain numpy slicing."""
    p = np.pad(np.asarray(array), pad)
    return p[tuple(slice(s + pad, s + pad + n) for s, n in zip(start, size))]


def check_pair(pair, image, body, patch, num_voxels):
    image, body, shape = np.asarray(image), np.asarray(body), np.array(image.shape)
    sa, sb, ca, cb = pair["start_a"], pair["start_b"], pair["coords_a"], pair["coords_b"]
    for v, s in (("a", sa), ("b", sb)):
        assert pair[f"patch_{v}"].dtype == np.float32 and pair[f"patch_{v}"].shape == patch
        np.testing.assert_array_equal(pair[f"patch_{v}"], padded_slice(image, s, patch))
        # start stays in the volume, or covers the whole axis when the volume is shorter
        assert np.all(s >= np.minimum(0, shape - patch)) and np.all(
            s <= np.maximum(0, shape - patch)
        )
    assert ca.dtype == cb.dtype == np.int64 and ca.shape == cb.shape and ca.shape[1] == 3
    assert np.all(ca >= 0) and np.all(ca < patch) and np.all(cb >= 0) and np.all(cb < patch)
    voxels = sa + ca
    np.testing.assert_array_equal(voxels, sb + cb)
    assert np.all(voxels >= 0) and np.all(
        voxels < shape
    )  # inside the volume (so in the intersection)
    a = pair["patch_a"][tuple(ca.T)]
    np.testing.assert_array_equal(a, pair["patch_b"][tuple(cb.T)])
    np.testing.assert_array_equal(a, image[tuple(voxels.T)].astype(np.float32))
    assert body[tuple(voxels.T)].all()
    assert len(np.unique(voxels, axis=0)) == len(voxels)  # no duplicate voxel within a pair
    # brute force: body voxels in both crops; all of them are used when fewer than num_voxels
    inside = np.ones(body.shape, bool)
    for ax, (a0, b0, p) in enumerate(zip(sa, sb, patch)):
        x = np.arange(body.shape[ax]).reshape([-1 if j == ax else 1 for j in range(3)])
        inside &= (x >= max(a0, b0)) & (x < min(a0, b0) + p)
    assert len(voxels) == min(num_voxels, int((inside & body).sum())) >= 1


@pytest.mark.parametrize("shape", [(37, 53, 19), (12, 40, 5), (10, 9, 6)])
def test_sample_pair_exact_correspondence(tmp_path, shape):
    rng = np.random.default_rng(1)
    image = memmapped(tmp_path, "image", rng.random(shape).astype(np.float32))  # values unique
    body = memmapped(tmp_path, "body", blob_body(shape, rng))
    for seed in range(20):
        pair = data.sample_pair(image, body, PATCH, 200, np.random.default_rng(seed))
        check_pair(pair, image, body, PATCH, 200)
    full = memmapped(tmp_path, "full", np.ones(shape, bool))  # border voxels too, all of them taken
    for seed in range(5):
        check_pair(
            data.sample_pair(image, full, PATCH, 10**6, np.random.default_rng(seed)),
            image,
            full,
            PATCH,
            10**6,
        )


def test_sample_pair_sparse_body(tmp_path):
    rng = np.random.default_rng(2)
    shape = (60, 60, 30)
    image = memmapped(tmp_path, "image", rng.random(shape).astype(np.float32))
    body = np.zeros(shape, bool)
    body[20:22, 30, 10:12] = True  # 4 voxels, and one far away
    body[50, 5, 25] = True
    body = memmapped(tmp_path, "body", body)
    counts = []
    for seed in range(20):
        pair = data.sample_pair(image, body, PATCH, 64, np.random.default_rng(seed))
        check_pair(pair, image, body, PATCH, 64)  # fewer voxels, no duplicates, >= 1
        counts.append(len(pair["coords_a"]))
    assert max(counts) == 4  # the retries found crops holding the whole cluster
    # a line of 16 body voxels along x (= the patch's x size): one crop pair often overlaps on
    # fewer than 8 of them, but the retries should reach 8 every time here
    body = np.zeros(shape, bool)
    body[10:26, 30, 10] = True
    body = memmapped(tmp_path, "line", body)
    for seed in range(20):
        pair = data.sample_pair(image, body, PATCH, 8, np.random.default_rng(seed))
        check_pair(pair, image, body, PATCH, 8)
        assert len(pair["coords_a"]) == 8


def test_anchor_fallback_and_empty_body(tmp_path):
    shape = (60, 60, 30)
    image = memmapped(tmp_path, "image", np.random.default_rng(3).random(shape).astype(np.float32))
    body = np.zeros(shape, bool)
    body[13, 7, 5] = True  # off the stride-4 grid: rejection and strided argwhere both miss it
    pair = data.sample_pair(
        image, memmapped(tmp_path, "body", body), PATCH, 64, np.random.default_rng(0)
    )
    np.testing.assert_array_equal(pair["start_a"] + pair["coords_a"], [[13, 7, 5]])
    with pytest.raises(ValueError, match="body"):
        data.sample_pair(image, np.zeros(shape, bool), PATCH, 64, np.random.default_rng(0))


def test_read_patch_matches_padded_slicing(tmp_path):
    a = memmapped(tmp_path, "a", np.random.default_rng(4).random((7, 9, 5)).astype(np.float32))
    for start in [
        (0, 0, 0),
        (-3, 2, -1),
        (5, -4, 3),
        (6, 8, 4),
        (-10, 0, 0),
        (7, 9, 5),
        (-2, -3, -4),
    ]:
        for size in [(4, 4, 4), (12, 3, 9), (1, 1, 1)]:
            np.testing.assert_array_equal(
                data.read_patch(a, start, size), padded_slice(a, start, size)
            )
    assert np.all(data.read_patch(a, (20, 0, 0), (3, 3, 3), fill=7) == 7)


def test_collate_pairs():
    rng = np.random.default_rng(5)
    pairs = [
        dict(
            patch_a=rng.random(PATCH, np.float32),
            patch_b=rng.random(PATCH, np.float32),
            coords_a=rng.integers(0, 8, (n, 3)),
            coords_b=rng.integers(0, 8, (n, 3)),
        )
        for n in (3, 1, 5)
    ]
    batch = data.collate_pairs([pairs[0], [pairs[1], pairs[2]]])  # dicts and lists of dicts
    assert batch["patches_a"].shape == (3, 1) + PATCH and batch["patches_a"].dtype == torch.float32
    np.testing.assert_array_equal(batch["patches_b"][2, 0].numpy(), pairs[2]["patch_b"])
    for v in "ab":
        c = batch[f"coords_{v}"]
        assert c.dtype == torch.int64 and c.shape == (9, 4)
        np.testing.assert_array_equal(c[:, 0].numpy(), [0, 0, 0, 1, 2, 2, 2, 2, 2])
        np.testing.assert_array_equal(
            c[:, 1:].numpy(), np.concatenate([p[f"coords_{v}"] for p in pairs])
        )


def test_pair_dataset_deterministic_and_worker_independent(pair_dir):
    def item(seed, i, **kw):
        return data.PairDataset(pair_dir, PATCH, 32, length=8, seed=seed, **kw)[i]

    def same(x, y):
        return all(np.array_equal(p[k], q[k]) for p, q in zip(x, y) for k in p if k != "case_id")

    assert same(item(0, 3), item(0, 3)) and not same(item(0, 3), item(1, 3))
    two = item(0, 4, pairs_per_volume=2)
    assert len(two) == 2 and two[0]["case_id"] == two[1]["case_id"] and not same(two[:1], two[1:])
    ds = data.PairDataset(pair_dir, PATCH, 32, pairs_per_volume=2, length=8, seed=0)
    batches = [
        list(
            torch.utils.data.DataLoader(
                ds, batch_size=2, num_workers=w, collate_fn=data.collate_pairs
            )
        )
        for w in (0, 2)
    ]
    assert len(batches[0]) == 4 and batches[0][0]["patches_a"].shape == (4, 1) + PATCH
    for b0, b1 in zip(*batches):
        assert all(torch.equal(b0[k], b1[k]) for k in b0)


def test_pair_dataset_on_disk_correspondence(pair_dir):
    ds = data.PairDataset(pair_dir, PATCH, 32, pairs_per_volume=3, length=9)
    for i in range(len(ds)):
        case = data.read_case(pair_dir, ds[i][0]["case_id"])
        for pair in ds[i]:
            check_pair(pair, case["image"][0], case["body"], PATCH, 32)


def test_data_folder_errors(tmp_path, pair_dir):
    with pytest.raises(InputError, match="missing: no such data folder"):
        data.read_dataset(tmp_path / "missing")
    with pytest.raises(InputError, match="dataset.json: missing"):
        data.read_dataset(tmp_path)
    with pytest.raises(InputError, match="format_version 2 \\(this code reads 1\\)"):
        data.read_dataset(write_dataset(tmp_path / "v2", [dict(id="x")], version=2))
    with pytest.raises(InputError, match="no cases"):
        data.read_dataset(write_dataset(tmp_path / "empty", []))
    with pytest.raises(InputError, match="nope"):
        data.read_case(pair_dir, "nope")
    with pytest.raises(InputError, match="nope"):
        data.PairDataset(pair_dir, case_ids=["nope"])
    with pytest.raises(InputError, match="labelled"):  # the pair cases have no labels
        data.LabelledPatchDataset(pair_dir, None, PATCH, 4)
    info = data.read_dataset(pair_dir)[1]
    assert (
        data.list_cases(info) == ["case_0", "case_1", "case_2"]
        and data.list_cases(info, labelled=True) == []
    )


@pytest.fixture(scope="module")
def label_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    big = np.zeros((40, 40, 20), np.uint8)
    big[5:8, 30:33, 2:5] = 1  # two small organs: rarely hit by a uniform patch
    big[33, 4:6, 15] = 2
    small = np.zeros((6, 5, 4), np.uint8)  # smaller than the patch on every axis
    small[1:3, 2, 1:4] = 3
    # image = (label + 0.25) / 10: image and label crops can be checked against each other,
    # and padding (image 0) can be told from the volume
    cases = [
        write_case(root, cid, ((lab + 0.25) / 10).astype(np.float16), lab > 0, lab)
        for cid, lab in (("big", big), ("small", small))
    ]
    return write_dataset(root, cases), big, small


def test_labelled_patches_foreground_oversampling(label_dir):
    root, big, small = label_dir
    patch = np.array((8, 8, 8))
    # exact random rate: fraction of uniform starts whose patch holds foreground (brute force)
    starts = list(itertools.product(*[range(d - p + 1) for d, p in zip(big.shape, patch)]))
    rate = np.mean([big[x : x + 8, y : y + 8, z : z + 8].any() for x, y, z in starts])
    n = 300
    for prob in (0.0, 0.5, 1.0):
        ds = data.LabelledPatchDataset(root, ["big"], tuple(patch), n, seed=0, foreground_prob=prob)
        items = [ds[i] for i in range(n)]
        for it in items[:20]:
            assert it["image"].shape == (1, 8, 8, 8) and it["image"].dtype == torch.float32
            assert it["label"].shape == (8, 8, 8) and it["label"].dtype == torch.int64
            np.testing.assert_array_equal(
                np.round(it["image"][0].numpy() * 10), it["label"].numpy()
            )
            assert (it["image"] > 0).all()  # a volume larger than the patch: no padding
        hit = np.mean([it["label"].any().item() for it in items])
        expected = prob + (1 - prob) * rate  # a foreground-centred patch always holds foreground
        assert abs(hit - expected) <= 4 * np.sqrt(expected * (1 - expected) / n) + 1e-9, (
            prob,
            hit,
            expected,
        )
    assert rate < 0.25  # otherwise the test above could not tell oversampling from chance
    ds = data.LabelledPatchDataset(root, ["small"], tuple(patch), 6, seed=0)
    for i in range(6):  # the patch covers the whole small volume, padding is label 0
        it = ds[i]
        assert (it["label"] == 3).sum() == (small == 3).sum() and (it["label"] > 0).sum() == (
            small > 0
        ).sum()
        assert torch.isclose(
            it["image"].sum(),
            torch.tensor(float(((small + 0.25) / 10).astype(np.float16).astype(np.float64).sum())),
        )


def test_class_voxels_subsample():
    label = np.zeros((20, 20, 10), np.uint8)
    label[:10] = 1
    label[15, 3, 4] = 7
    vox = data.class_voxels(label, np.random.default_rng(0), max_voxels=50)
    assert sorted(vox) == [1, 7] and len(vox[1]) == 50 and len(np.unique(vox[1], axis=0)) == 50
    assert np.all(label[tuple(vox[1].T)] == 1)
    np.testing.assert_array_equal(vox[7], [[15, 3, 4]])


def test_cases_smaller_than_the_patch_are_named(label_dir, capsys):
    root = label_dir[0]
    data.LabelledPatchDataset(root, ["big", "small"], (8, 8, 8), 4, seed=0)
    out = capsys.readouterr().out
    assert "note: 1 case(s) smaller than the patch (8, 8, 8), zero-padded: small (6, 5, 4)" in out
    assert "big" not in out
    data.LabelledPatchDataset(root, ["big"], (8, 8, 8), 4, seed=0)
    assert "smaller than the patch" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "break_it, words",
    [
        ("truncate image", "image.npy: unreadable"),
        ("delete label", "label.npy: missing"),
        ("bad meta", "meta.json: unreadable"),
        ("delete meta", "not found or incomplete"),
        ("short body", "body.npy: shape (2, 2, 2) != image (40, 40, 20)"),
        ("flat image", "image.npy: shape (4, 4), not (X, Y, Z) or (C, X, Y, Z)"),
    ],
)
def test_the_case_reader_names_the_case_the_file_and_the_fix(label_dir, tmp_path, break_it, words):
    """Every way a preprocessed case can be broken is one line naming the case (or its file) and
    the fix, from the one reader every stage uses, and before any work: a dataset reads each case
    once when it is made."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(label_dir[0], root)
    case = root / "cases" / "big"
    if break_it == "truncate image":
        (case / "image.npy").write_bytes((case / "image.npy").read_bytes()[:1000])
    elif break_it == "delete label":
        (case / "label.npy").unlink()
    elif break_it == "bad meta":
        (case / "meta.json").write_text("{not json")
    elif break_it == "delete meta":
        (case / "meta.json").unlink()
    elif break_it == "flat image":
        np.save(case / "image.npy", np.zeros((4, 4), np.float16))
    else:
        np.save(case / "body.npy", np.ones((2, 2, 2), bool))
    with pytest.raises(InputError, match="re-run preprocess.py") as e:
        data.LabelledPatchDataset(root, ["big", "small"], (8, 8, 8), 4)
    assert words in str(e.value) and "\n" not in str(e.value) and str(case) in str(e.value)


def test_a_multi_channel_case_is_read_as_channels(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((2, 10, 9, 8)).astype(np.float16)
    body = np.ones((10, 9, 8), bool)
    label = (rng.random((10, 9, 8)) > 0.5).astype(np.uint8)
    root = write_dataset(tmp_path, [write_case(tmp_path, "mc", image, body, label)])
    case = data.read_case(root, "mc")
    assert case["image"].shape == (2, 10, 9, 8) and case["label"].shape == (10, 9, 8)
    item = data.LabelledPatchDataset(root, None, (8, 8, 8), 2, foreground_prob=0)[0]
    assert item["image"].shape == (2, 8, 8, 8)
    pairs = data.PairDataset(root, (8, 8, 8), 16, length=2)  # pretraining: one volume per channel
    assert pairs.volumes == [("mc", 0), ("mc", 1)]
    for i, channel in enumerate((0, 1)):
        check_pair(pairs[i][0], image[channel], body, (8, 8, 8), 16)


def test_the_reader_reads_whole_only_what_preprocess_did_not_write(
    label_dir, tmp_path, monkeypatch
):
    """A case's arrays carry their identity (size, time) in meta.json, recorded by preprocess.py,
    which checked them: such a case is not read whole. An array replaced since (its identity
    differs) is read whole once, in the main process: a non-finite voxel, an empty body and a label
    value that is not a class of dataset.json are each one line naming the case, the file and the
    value; a label value outside the classes is named from meta.json's record too."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(label_dir[0], root)
    info = json.loads((root / "dataset.json").read_text())
    info["labels"] = {"0": "background", "1": "a", "2": "b", "3": "c"}
    (root / "dataset.json").write_text(json.dumps(info))
    case = root / "cases" / "big"
    meta = json.loads((case / "meta.json").read_text())
    meta.update(
        arrays={n: data.file_identity(case / n) for n in ("image.npy", "body.npy", "label.npy")},
        label_values=[0, 1, 2],
    )
    (case / "meta.json").write_text(json.dumps(meta))
    real = np.isfinite
    read_whole = []
    monkeypatch.setattr(data.np, "isfinite", lambda a: read_whole.append(a.shape) or real(a))
    data.LabelledPatchDataset(root, ["big"], (8, 8, 8), 4)
    assert read_whole == []  # recorded, unchanged: trusted
    image = np.load(case / "image.npy")
    image[3, 4, 5] = np.nan
    np.save(case / "image.npy", image)
    with pytest.raises(
        InputError, match=r"big/image.npy: a non-finite voxel \(nan at \(0, 3, 4, 5\)\); re-run"
    ):
        data.LabelledPatchDataset(root, ["big"], (8, 8, 8), 4)
    np.save(case / "image.npy", np.nan_to_num(image))
    label = np.load(case / "label.npy")
    label[0, 0, 0] = 9
    np.save(case / "label.npy", label)
    with pytest.raises(
        InputError,
        match=r"big/label.npy: label value 9, not a class of its dataset.json \(0, 1, 2, 3\)",
    ):
        data.LabelledPatchDataset(root, ["big"], (8, 8, 8), 4)
    label[0, 0, 0] = 0
    np.save(case / "label.npy", label)
    np.save(case / "body.npy", np.zeros(label.shape, bool))
    with pytest.raises(InputError, match=r"big/body.npy: no body voxel"):
        data.PairDataset(root, (8, 8, 8), 4, case_ids=["big"])
    del info["labels"]["2"]
    (root / "dataset.json").write_text(json.dumps(info))
    np.save(case / "body.npy", label > 0)
    meta["arrays"] = {
        n: data.file_identity(case / n) for n in ("image.npy", "body.npy", "label.npy")
    }
    (case / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"label value 2, not a class"):  # from meta.json's record
        data.LabelledPatchDataset(root, ["big"], (8, 8, 8), 4)


def test_a_dataset_records_the_identity_of_every_case_it_read(pair_dir):
    inputs = data.PairDataset(pair_dir, PATCH, 32, length=4).inputs
    assert sorted(Path(k).name for k in inputs) == ["case_0", "case_1", "case_2"]
    case = Path(pair_dir) / "cases" / "case_0"
    assert inputs[str(case.resolve())]["image.npy"] == data.file_identity(case / "image.npy")
