"""downstream.py, what the probe, fine-tuning and prediction share: the sliding window (every voxel
covered, the Gaussian blend against a naive loop, an FPN pyramid level by level), folds, splits
and label budgets, the shared start's refusals (one line, before any work), the results table."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import downstream
import finetune
import linear_probe
from data import InputError

FT = [
    "--steps",
    "3",
    "--batch-size",
    "1",
    "--patch-size",
    "16",
    "16",
    "8",
    "--workers",
    "0",
    "--bn-batches",
    "2",
    "--eval-patch-size",
    "64",
    "64",
    "32",
    "--preset",
    "demo",
]  # no fold choice: with --split / --test-data
TINY = [*FT, "--folds", "2", "--fold", "0"]


# ----------------------------------------------------------------------------- the sliding window


@pytest.mark.parametrize(
    "shape,window",
    [
        ((37, 53, 19), (16, 16, 8)),
        ((5, 6, 7), (8, 8, 8)),
        ((16, 16, 8), (16, 16, 8)),
        ((17, 8, 9), (8, 8, 4)),
    ],
)
def test_tile_starts_cover_every_voxel(shape, window):
    for overlap in (0.0, 0.5, 0.75):
        padded = tuple(max(d, p) for d, p in zip(shape, window))
        count = np.zeros(padded, int)
        for s in downstream.tile_starts(shape, window, overlap):
            assert all(0 <= a and a + p <= d for a, p, d in zip(s, window, padded))
            count[s[0] : s[0] + window[0], s[1] : s[1] + window[1], s[2] : s[2] + window[2]] += 1
        assert count.min() >= 1


def naive_blend(image, predict_fn, window, overlap, scale=1, align=1):
    """Reference: tile by tile, numpy Gaussian weights, weighted average at one output scale."""
    shape = image.shape[1:]
    padded = [max(-(-d // align) * align, p) for d, p in zip(shape, window)]
    img = np.zeros((image.shape[0], *padded), np.float32)
    img[:, : shape[0], : shape[1], : shape[2]] = image.numpy()
    out_window = [p // scale for p in window]
    g = [np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / (p / 8)) ** 2) for p in out_window]
    w = np.maximum(
        np.einsum("i,j,k->ijk", *g) / (g[0].max() * g[1].max() * g[2].max()),
        downstream.WEIGHT_FLOOR,
    )
    num, den = 0.0, np.zeros([p // scale for p in padded])
    for s in downstream.tile_starts(padded, window, overlap):
        s = [a // align * align for a in s]
        box = tuple(slice(a, a + p) for a, p in zip(s, window))
        pred = predict_fn(torch.from_numpy(img[(slice(None),) + box][None]))[0].numpy()
        out_box = tuple(slice(a // scale, a // scale + p) for a, p in zip(s, out_window))
        tile = np.zeros((pred.shape[0], *den.shape))
        tile[(slice(None),) + out_box] = pred * w
        num, den[out_box] = num + tile, den[out_box] + w
    return (num / den)[:, : -(-shape[0] // scale), : -(-shape[1] // scale), : -(-shape[2] // scale)]


@pytest.mark.parametrize("shape", [(20, 19, 11), (5, 12, 3)])
def test_sliding_window_blends_like_a_naive_loop(shape):
    window = (8, 8, 4)
    image = torch.rand((2,) + shape, generator=torch.Generator().manual_seed(0))
    # noqa: E731
    const = lambda x: torch.tensor([3.0, -1.5]).view(1, 2, 1, 1, 1).expand(len(x), 2, *window)
    out = downstream.sliding_window(image, const, window)
    assert out.shape == (2,) + shape and out.device == image.device and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.tensor(3.0)) and torch.allclose(out[1], torch.tensor(-1.5))
    assert torch.allclose(
        downstream.sliding_window(image, lambda x: x, window, 0.5, 3), image, atol=1e-6
    )
    # a tile-dependent prediction (each tile's mean + its voxels) exercises the weighting
    # noqa: E731
    tile_fn = lambda x: (x.mean(dim=(1, 2, 3, 4), keepdim=True) + x[:, :1]).expand(-1, 3, *window)
    ref = naive_blend(image, tile_fn, window, 0.5)
    outs = [downstream.sliding_window(image, tile_fn, window, 0.5, b) for b in (1, 3, 1000)]
    for o in outs:
        np.testing.assert_allclose(o.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_sliding_window_keeps_every_pyramid_level_on_its_grid():
    """An FPN-like map list (level l at 1/2**l): windows aligned to 2**(L-1), each level blended on
    its own grid and cut to ceil(size / 2**l), against the naive loop at each scale."""
    image = torch.rand((1, 21, 18, 11), generator=torch.Generator().manual_seed(1))
    pool = lambda x, l: torch.nn.functional.avg_pool3d(x, 2**l) if l else x  # noqa: E731
    # noqa: E731
    fn = lambda x: [pool(x, l) + x.mean(dim=(1, 2, 3, 4), keepdim=True) for l in range(3)]
    levels = downstream.sliding_window(image, fn, (8, 8, 8), overlap=0.5, batch_size=1, align=4)
    assert [tuple(a.shape) for a in levels] == [(1, 21, 18, 11), (1, 11, 9, 6), (1, 6, 5, 3)]
    for l, level in enumerate(levels):
        ref = naive_blend(image, lambda x: fn(x)[l], (8, 8, 8), 0.5, scale=2**l, align=4)
        np.testing.assert_allclose(level.numpy(), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- folds, splits,
# budgets


def test_fold_split_partitions_the_cases():
    ids = [f"c{i}" for i in range(10)]
    folds = downstream.split_folds(ids, 3, seed=0)
    tests = sum((te for _, te in folds), [])
    assert sorted(tests) == ids
    for tr, te in folds:
        assert not set(tr) & set(te) and sorted(tr + te) == ids


def test_fixed_split_and_draws(small_demo, tmp_path):
    """preprocess.py --demo writes split.json (disjoint train / val / test); --split trains on the
    pool and scores the test (or --evaluate-on val) cases; --draw k picks another subset of the
    pool; a split that names other cases is refused with one line."""
    split = json.loads((Path(small_demo) / "split.json").read_text())
    import data

    info = data.read_dataset(small_demo)[1]
    ids = data.list_cases(info, labelled=True)
    plan = lambda a: downstream.plan_folds(a, Path(small_demo), info, info)  # noqa: E731
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(ids)
    assert split["train"] and split["val"] and split["test"]
    base = [
        "--data",
        str(small_demo),
        "--init",
        "random",
        "--split",
        str(Path(small_demo) / "split.json"),
    ]
    args = finetune.parse_args([*base, "--out", str(tmp_path / "a")])
    assert plan(args) == [(0, split["train"], split["test"])]
    args = finetune.parse_args(
        [*base, "--out", str(tmp_path / "a"), "--evaluate-on", "val", "--train-cases", "1"]
    )
    ((_, train, scored),) = plan(args)
    assert scored == split["val"] and len(train) == 1 and train[0] in split["train"]
    draws = {
        tuple(
            plan(
                finetune.parse_args([*base, "--out", "o", "--train-cases", "1", "--draw", str(k)])
            )[0][1]
        )
        for k in range(6)
    }
    assert len(draws) == len(split["train"])  # 6 draws of 1 case reach every pool case (2 here)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(train=["nope"], val=[], test=split["test"])))
    with pytest.raises(InputError, match="bad.json: train / val / test must be disjoint"):
        plan(finetune.parse_args([*base[:-1], str(bad), "--out", "o"]))


@pytest.mark.parametrize(
    "split, words",
    [
        (
            lambda s: dict(train=s["train"] + s["test"][:1], val=s["val"], test=s["test"]),
            "is in both 'train' and 'test'",
        ),
        (
            lambda s: dict(train=s["train"] + ["demo_999"], val=s["val"], test=s["test"]),
            "'demo_999' in 'train' is not a labelled",
        ),
        (
            lambda s: dict(train=[], val=s["val"], test=s["test"] + s["train"]),
            "the 'train' list is empty",
        ),
        (
            lambda s: dict(train=s["train"] + s["val"], val=[], test=s["test"]),
            "the split's 'val' list is empty",
        ),
    ],
)
def test_split_errors_name_the_case_or_list(small_demo, tmp_path, split, words):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split(json.loads((Path(small_demo) / "split.json").read_text()))))
    for module, flags in ((finetune, FT), (linear_probe, ["--preset", "demo", "--max-steps", "3"])):
        with pytest.raises(InputError, match=words):
            module.main(
                module.parse_args(
                    [
                        "--data",
                        str(small_demo),
                        "--init",
                        "random",
                        "--out",
                        str(tmp_path / "o"),
                        *flags,
                        "--split",
                        str(path),
                        "--evaluate-on",
                        "val",
                    ]
                )
            )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (
            ["--split", "--folds", "5"],
            "--folds has no effect in this run (--split / --test-data fix one split)",
        ),
        (
            ["--evaluate-on", "val"],
            "--evaluate-on has no effect in this run (it picks a list of --split)",
        ),
        (
            ["--draw", "2"],
            "--draw has no effect in this run (it picks another draw of --train-cases)",
        ),
        (
            ["--split", "--test-data", "x"],
            "--split and --test-data are two ways to choose the test cases: give one",
        ),
        (["--train-cases", "0"], "argument --train-cases: must be >= 1"),
    ],
)
def test_flags_the_downstream_scripts_cannot_honour(small_demo, tmp_path, flags, words, capsys):
    for module in (finetune, linear_probe):
        with pytest.raises(SystemExit) as e:
            module.parse_args(
                ["--data", str(small_demo), "--init", "random", "--out", str(tmp_path), *flags]
            )
        assert e.value.code == 2 and words in capsys.readouterr().err
    with pytest.raises(SystemExit):
        linear_probe.parse_args(
            ["--data", str(small_demo), "--out", str(tmp_path)]
        )  # neither backbone nor --init
    assert "give exactly one of --checkpoint" in capsys.readouterr().err


def test_train_cases_more_than_a_fold_holds(small_demo, tmp_path):
    with pytest.raises(InputError, match="--train-cases 99: must be between 1 and 2"):
        finetune.main(
            finetune.parse_args(
                [
                    "--data",
                    str(small_demo),
                    "--init",
                    "random",
                    "--out",
                    str(tmp_path),
                    *TINY,
                    "--train-cases",
                    "99",
                ]
            )
        )
    assert not tmp_path.joinpath("results.json").exists()


def test_test_data_must_be_kept_apart_from_the_training_cases(small_demo, tmp_path):
    """--test-data that is --data, or holds the same scans preprocessed again elsewhere, is refused
    naming the cases; classes, channels or a spacing that differ are named, before any work."""
    copy = tmp_path / "copy"
    shutil.copytree(small_demo, copy, ignore=shutil.ignore_patterns("raw", "unlabelled"))
    for test_data in (small_demo, copy):
        with pytest.raises(
            InputError,
            match=r"--test-data .* holds training cases of --data .*\(demo_000, demo_001",
        ):
            finetune.main(
                finetune.parse_args(
                    [
                        "--data",
                        str(small_demo),
                        "--test-data",
                        str(test_data),
                        "--init",
                        "random",
                        "--out",
                        str(tmp_path / "o"),
                        *FT,
                    ]
                )
            )
    original = json.loads((copy / "dataset.json").read_text())
    for change, words in (
        (lambda m: m["labels"].update({"1": "something_else"}), "its classes .*something_else"),
        (lambda m: m["channels"].append(dict(name="T2", scheme="mri")), "its preprocessing .*T2"),
        (lambda m: m["preset"].update(spacing=[1.5, 1.5, 1.5]), "its preprocessing .*1.5"),
    ):
        meta = json.loads(json.dumps(original))
        change(meta)
        (copy / "dataset.json").write_text(json.dumps(meta))
        for module in (finetune, linear_probe):
            with pytest.raises(
                InputError, match=f"--test-data {copy}: {words}.* differ from --data"
            ):
                module.main(
                    module.parse_args(
                        [
                            "--data",
                            str(small_demo),
                            "--test-data",
                            str(copy),
                            "--init",
                            "random",
                            "--out",
                            str(tmp_path / "o"),
                            "--preset",
                            "demo",
                        ]
                    )
                )
    assert not (tmp_path / "o").exists()


def test_cuda_on_a_cpu_build_is_one_line(small_demo, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(
        InputError, match="--device cuda: not a device of this machine \\(cpu; torch"
    ):
        finetune.main(
            finetune.parse_args(
                [
                    "--data",
                    str(small_demo),
                    "--init",
                    "random",
                    "--out",
                    str(tmp_path),
                    *TINY,
                    "--device",
                    "cuda",
                ]
            )
        )


# ----------------------------------------------------------------------------- results


def test_summary_ignores_absent_classes():
    names = {0: "bg", 1: "a", 2: "b"}
    fold = {0: np.array([[1.0, np.nan], [0.5, 0.0]])}  # class b absent from case 0: ignored there
    r = downstream.summarise(fold, names)
    assert r["per_class"] == {"a": 0.75, "b": 0.0}
    assert r["mean_dice"] == pytest.approx(np.mean([1.0, 0.25]))
