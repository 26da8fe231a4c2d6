"""Tests for preprocess.py against naive references (per-voxel affine arithmetic,
scipy.ndimage.map_coordinates, np.percentile, brute-force loops) on tiny synthetic scans.

Run: python -m pytest -q tests/test_preprocess.py
"""
import argparse
import gzip
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import preprocess  # noqa: E402

DEMO_SCALE = 0.6  # twice the demo scale: round-trip Dice is measured on organs of realistic voxel size; 3 cases


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("demo")
    return preprocess.build_demo(data_dir, num_cases=3, unlabelled_cases=0, seed=1, scale=DEMO_SCALE)


def load_case(data_dir, case_id):
    folder = Path(data_dir) / "cases" / case_id
    meta = json.loads((folder / "meta.json").read_text())
    return meta, {n: np.load(folder / f"{n}.npy") for n in ("image", "body", "label")
                  if (folder / f"{n}.npy").is_file()}


def dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def tiny_scan(rng, shape=(20, 18, 8)):
    """A small CT-like scan: an ellipse of soft tissue (HU) in air, two label blobs."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.7) ** 2 < 1
    image = np.where(inside, 40.0, -1000.0) + rng.normal(0, 10, shape)
    label = np.zeros(shape, np.uint8)
    label[inside & (x > 0.2)] = 1
    label[inside & (x < -0.3) & (y > 0)] = 2
    return image.astype(np.int16), label


def save(path, array, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


# a permuted, flipped, anisotropic, translated affine (like DICOM-derived LPS data)
AFFINE = np.array([[0.0, -1.5, 0, 30], [0, 0, -1.5, 20], [3.0, 0, 0, -40], [0, 0, 0, 1]])


def args(**kw):
    base = dict(input=None, output=None, modality="ct", spacing=None, workers=1, demo=None,
                num_cases=20, seed=0, force=False, unlabelled_cases=0)
    return argparse.Namespace(**{**base, **kw})


# ------------------------------------------------------------------ geometry

def test_round_trip_demo_labels(demo, tmp_path):
    """Preprocessed demo labels mapped back match the raw labels on the original grid."""
    for case_id in ("demo_000", "demo_001"):
        meta, arrays = load_case(demo, case_id)
        raw = nib.load(str(demo / "raw" / "labelsTr" / f"{case_id}.nii.gz"))
        original = np.asarray(raw.dataobj)
        assert not np.allclose(raw.affine[:3, :3], np.diag(np.diag(raw.affine[:3, :3])))
        back = preprocess.to_original_grid(arrays["label"], meta)
        assert back.shape == original.shape
        scores = [dice(back == c, original == c) for c in range(1, 9)]
        print(case_id, "round-trip Dice per class", np.round(scores, 3), np.mean(scores))
        assert np.mean(scores) >= 0.95
        assert arrays["body"][arrays["label"] > 0].all()  # gas inside organs counts as body
    path = preprocess.save_nifti(preprocess.to_original_grid(arrays["label"], meta), meta["original_affine"],
                                 tmp_path / "pred.nii.gz")
    written = nib.load(str(path))
    assert written.shape == original.shape and np.allclose(written.affine, raw.affine)
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(written.dataobj), back)
    assert [p.name for p in tmp_path.iterdir()] == ["pred.nii.gz"]


def naive_original_values(array, meta, voxel, fill):
    """The nearest preprocessed voxel's value for one original voxel, via world coordinates
    (affines). -> set of admissible values (two on an exact tie between neighbours)."""
    world = np.asarray(meta["original_affine"]) @ [*voxel, 1]
    c = np.linalg.solve(np.asarray(meta["affine"]), world)[:3]  # preprocessed voxel coords
    start = np.array([b[0] for b in meta["crop_box"]])
    options = [{np.floor(x + 0.5)} | ({np.floor(x), np.ceil(x)} if abs(x % 1 - 0.5) < 1e-6
                                      else set()) for x in c + start]  # resampled grid
    values = set()
    for m in itertools.product(*options):
        m = np.clip(m, 0, np.array(meta["resampled_shape"]) - 1) - start
        inside = np.all(m >= 0) and np.all(m < array.shape)
        values.add(array[tuple(m.astype(int))] if inside else fill)
    return values


def check_inverse_exact(meta, rng, num=300):
    shape = meta["shape"]
    encoded = np.arange(1, np.prod(shape) + 1, dtype=np.int64).reshape(shape)  # voxel index
    back = preprocess.to_original_grid(encoded, meta, fill=0)
    assert list(back.shape) == meta["original_shape"]
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in back.shape], indexing="ij"))
    for v in np.concatenate([corners.reshape(3, -1).T, rng.integers(0, back.shape, (num, 3))]):
        assert back[tuple(v)] in naive_original_values(encoded, meta, v, 0), v
    assert len(np.unique(back)) > 1


def test_inverse_mapping_exact_demo(demo):
    meta, _ = load_case(demo, "demo_002")
    check_inverse_exact(meta, np.random.default_rng(0))


@pytest.mark.parametrize("affine", [
    AFFINE,
    np.diag([0.7, 0.7, 5.0, 1.0]),
    np.array([[-0.9, 0, 0, 5], [0, 0, 2.5, -3], [0, 1.1, 0, 8], [0, 0, 0, 1.0]]),
])
def test_inverse_mapping_exact_synthetic(affine):
    rng = np.random.default_rng(1)
    image, label = tiny_scan(rng, (24, 20, 10))
    _, _, label_out, meta = preprocess.preprocess_arrays(image, affine, "ct", label=label)
    check_inverse_exact(meta, rng)
    # the stored affine maps each preprocessed voxel to the world position it was sampled at
    canonical = nib.as_closest_canonical(nib.Nifti1Image(label, affine))
    start = np.array([b[0] for b in meta["crop_box"]])
    for v in rng.integers(0, meta["shape"], (20, 3)):
        world = np.asarray(meta["affine"]) @ [*v, 1]
        c = np.linalg.solve(canonical.affine, world)[:3]
        r = (v + start) * np.asarray(meta["spacing"]) / nib.affines.voxel_sizes(canonical.affine)
        assert np.allclose(c, r)
        assert label_out[tuple(v)] == np.asarray(canonical.dataobj)[
            tuple(np.minimum(np.floor(c + 0.5).astype(int), np.array(canonical.shape) - 1))]


def test_resample_matches_map_coordinates():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(17, 13, 9)).astype(np.float32)
    ratio = np.array([0.7, 1.3, 0.45])
    new_shape = preprocess.resampled_shape(image.shape, np.ones(3), ratio)
    assert new_shape == tuple(int((n - 1) / r) + 1 for n, r in zip(image.shape, ratio))
    out = preprocess.resample_image(image, ratio, new_shape)
    grid = np.meshgrid(*[np.arange(n) * r for n, r in zip(new_shape, ratio)], indexing="ij")
    reference = ndimage.map_coordinates(image, grid, order=1, mode="nearest")
    assert np.allclose(out, reference, atol=1e-5)


def test_mri_preset():
    """MRI: resample, clip to the 0.01 / 99.9 percentiles, scale, crop to > 0.3 (Sec. 3.1)."""
    rng = np.random.default_rng(3)
    shape = (30, 26, 14)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    image = np.where(x ** 2 + (y - 0.2) ** 2 + z ** 2 < 0.5, 400.0, 5.0) + rng.normal(0, 20, shape)
    image[3, 4, 5] = 1e5  # an outlier, removed by the percentile clip
    affine = np.diag([1.2, 1.2, 2.0, 1.0])
    image01, body, label, meta = preprocess.preprocess_arrays(image, affine, "mri")
    ratio = 1.5 / np.array([1.2, 1.2, 2.0])
    new_shape = [int(np.floor((n - 1) / r + 1e-6)) + 1 for n, r in zip(shape, ratio)]
    grid = np.meshgrid(*[np.arange(n) * r for n, r in zip(new_shape, ratio)], indexing="ij")
    resampled = ndimage.map_coordinates(image, grid, order=1)
    lo, hi = np.percentile(resampled, [0.01, 99.9])
    scaled = (np.clip(resampled, lo, hi) - lo) / (hi - lo)
    inside = np.argwhere(scaled > 0.3)
    box = [[int(a), int(b) + 1] for a, b in zip(inside.min(0), inside.max(0))]
    assert meta["crop_box"] == box and label is None
    assert np.allclose(image01, scaled[tuple(slice(a, b) for a, b in box)], atol=1e-4)
    assert image01.min() >= 0 and image01.max() <= 1
    assert np.array_equal(body | (image01 > 0.3), body)


# ------------------------------------------------------------------ folders and bad input

def write_raw_folder(root, rng):
    """Decathlon layout: 3 good cases and one of each kind of bad input."""
    image, label = tiny_scan(rng)
    save(root / "imagesTr" / "good_a.nii.gz", image, AFFINE)
    save(root / "labelsTr" / "good_a.nii.gz", label, AFFINE)
    save(root / "imagesTr" / "good_b_0000.nii.gz", image, AFFINE)  # nnU-Net channel suffix
    save(root / "labelsTr" / "good_b.nii.gz", label, AFFINE)
    save(root / "imagesTr" / "good_c.nii.gz", image[..., None], AFFINE)  # squeezable 4th dim
    save(root / "labelsTr" / "good_c.nii.gz", label, AFFINE)
    bad = {
        "four_d": (np.stack([image, image], -1), label, "4-D image of shape (20, 18, 8, 2)"),
        "shape": (image, label[:, :, :7], "label shape (20, 18, 7) differs"),
        "affine": (image, label, "label affine differs"),
        "fraction": (image, label.astype(np.float32) * 0.5, "non-integer label values"),
        "negative": (image, label.astype(np.int16) - 1, "negative label values"),
        "too_big": (image, label.astype(np.int16) * 300, "label values up to 600"),
        "nan": (np.where(label > 0, np.nan, image.astype(np.float32)), label, "NaN/inf voxels"),
        "blank": (np.zeros_like(image), label, "every voxel is 0: an empty or blank scan"),
        "singular": (image, label, "singular or rank-deficient affine"),
        "huge": (image, label, "GiB as float32 (limit 4.0 GiB); is the voxel size in the header right"),
    }
    affines = {"singular": np.diag([1.5, 1.5, 0.0, 1.0]), "huge": np.diag([500.0, 500.0, 500.0, 1.0])}
    expected = {}
    for name, (img, lab, message) in bad.items():
        affine = affines.get(name, AFFINE)
        if name == "singular":   # only an sform can hold it (a qform is a rotation): a rank-2 affine
            nifti = nib.Nifti1Image(img, None)
            nifti.set_sform(affine, code=1)
            nifti.set_qform(None, code=0)
            nib.save(nifti, str(root / "imagesTr" / f"{name}.nii.gz"))
        else:
            save(root / "imagesTr" / f"{name}.nii.gz", img, affine)
        lab_affine = AFFINE + np.eye(4, k=3) * 0.5 if name == "affine" else AFFINE if name == "singular" else affine
        save(root / "labelsTr" / f"{name}.nii.gz", lab, lab_affine)
        folder = "imagesTr" if name in ("four_d", "nan", "blank", "singular", "huge") else "labelsTr"
        expected[f"{folder}/{name}.nii.gz"] = message
    blob = gzip.compress(nib.Nifti1Image(image, AFFINE).to_bytes())
    (root / "imagesTr" / "truncated.nii.gz").write_bytes(blob[:len(blob) // 2])
    save(root / "labelsTr" / "truncated.nii.gz", label, AFFINE)
    (root / "imagesTr" / "garbage.nii").write_bytes(b"not a nifti file" * 40)
    save(root / "labelsTr" / "garbage.nii.gz", label, AFFINE)
    save(root / "imagesTr" / "no_label.nii.gz", image, AFFINE)
    save(root / "imagesTr" / "good_b_0001.nii.gz", image, AFFINE)  # a second channel
    save(root / "imagesTs" / "test_a.nii.gz", image, AFFINE)  # unlabelled test split
    save(root / "labelsTr" / "no_image.nii.gz", label, AFFINE)
    expected.update({"imagesTr/truncated.nii.gz": "unreadable or corrupt NIfTI",
                     "imagesTr/garbage.nii": "unreadable or corrupt NIfTI",
                     "imagesTr/no_label.nii.gz": "no label labelsTr/no_label.nii.gz",
                     "imagesTr/good_b_0001.nii.gz": "channel _0001, but the dataset has 1 channel(s)",
                     "labelsTr/no_image.nii.gz": "label without an image"})
    return expected


def test_bad_inputs_reported_and_good_cases_finish(tmp_path, capsys):
    expected = write_raw_folder(tmp_path / "raw", np.random.default_rng(4))
    code = preprocess.main(args(input=str(tmp_path / "raw"), output=str(tmp_path / "out")))
    out, err = capsys.readouterr()
    failed = [line for line in err.splitlines() if line.startswith("FAILED ")]
    print("\n".join(failed))
    assert code == 1
    assert len(failed) == len(expected)
    for name, message in expected.items():
        lines = [line for line in failed if line.startswith(f"FAILED {name}: ")]
        assert len(lines) == 1 and message in lines[0], (name, lines)
    assert f"done 4 / skipped 0 / failed {len(expected)}" in out
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert [(c["id"], c["split"]) for c in info["cases"]] == [
        ("good_a", "train"), ("good_b", "train"), ("good_c", "train"), ("test_a", "test")]
    assert info["labels"] == {"0": "background", "1": "class_1", "2": "class_2"}
    _, arrays = load_case(tmp_path / "out", "good_b")
    assert arrays["image"].dtype == np.float16 and arrays["label"].dtype == np.uint8


def test_empty_folder_is_fatal(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("no scans here")
    with pytest.raises(preprocess.PreprocessError, match="no .nii / .nii.gz files found"):
        preprocess.main(args(input=str(tmp_path / "raw"), output=str(tmp_path / "o")))
    run = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), "--input",
                          str(tmp_path / "raw"), "--output", str(tmp_path / "o"), "--modality",
                          "ct"], capture_output=True, text=True)
    assert run.returncode == 2 and "no .nii / .nii.gz files found" in run.stderr


def test_rerun_skips_finished_cases_and_leaves_no_temp_files(tmp_path, capsys):
    rng = np.random.default_rng(5)
    for name in ("a", "b", "c"):
        image, label = tiny_scan(rng)
        save(tmp_path / "raw" / "imagesTr" / f"{name}.nii.gz", image, AFFINE)
        save(tmp_path / "raw" / "labelsTr" / f"{name}.nii.gz", label, AFFINE)
    raw, out = tmp_path / "raw", tmp_path / "out"
    assert preprocess.preprocess_folder(raw, out, "ct", workers=2)["done"] == 3
    (out / "cases" / "b" / "meta.json").unlink()  # as if killed before the case finished
    result = preprocess.preprocess_folder(raw, out, "ct", workers=1)
    assert (result["done"], result["skipped"], result["failed"]) == (1, 2, [])
    assert "done 1 / skipped 2 / failed 0" in capsys.readouterr().out
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]
    assert len(json.loads((out / "dataset.json").read_text())["cases"]) == 3
    # another spacing is another preset: refused without --force (its cases would be replaced) ...
    with pytest.raises(ValueError, match=r"holds a run with other settings \(--preset .*spacing.*pass --force"):
        preprocess.preprocess_folder(raw, out, "ct", spacing=(2, 2, 4))
    # ... and with it, nothing is skipped
    assert preprocess.preprocess_folder(raw, out, "ct", spacing=(2, 2, 4), force=True)["skipped"] == 0


def test_flat_folder_is_unlabelled(tmp_path):
    rng = np.random.default_rng(6)
    for name in ("scan1.nii.gz", "scan2.nii", "scan2.nii.gz"):
        save(tmp_path / "raw" / name, tiny_scan(rng)[0], AFFINE)
    result = preprocess.preprocess_folder(tmp_path / "raw", tmp_path / "out", "ct")
    assert result["done"] == 2
    assert result["failed"] == ["scan2.nii.gz: duplicate case id 'scan2'"]
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["labels"] is None
    assert [(c["id"], c["split"], c["labelled"]) for c in info["cases"]] == [
        ("scan1", "unlabelled", False), ("scan2", "unlabelled", False)]
    assert not (tmp_path / "out" / "cases" / "scan1" / "label.npy").exists()


def test_output_inside_input_is_refused(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "dataset.json").write_text('{"labels": {"0": "background"}}')
    before = (raw / "dataset.json").read_bytes()
    for out in (raw, raw / "pre"):
        with pytest.raises(preprocess.PreprocessError, match="is \\(inside\\) --input"):
            preprocess.main(args(input=str(raw), output=str(out)))
    assert (raw / "dataset.json").read_bytes() == before and not (raw / "pre").exists()


@pytest.mark.parametrize("spacing", [[float("nan"), 1, 1], [0, 1, 1], [-1, 1, 2]])
def test_bad_spacing_fails_at_parse_time(tmp_path, capsys, spacing):
    with pytest.raises(SystemExit) as e:
        preprocess.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--modality", "ct",
                               "--spacing", *map(str, spacing)])
    assert e.value.code == 2 and "argument --spacing: must be" in capsys.readouterr().err
    with pytest.raises(ValueError, match="spacing must be 3 positive numbers"):
        preprocess.make_preset("ct", spacing)



def _die_on_b(job):
    """A worker that is killed (as the out-of-memory killer would) on case 'b'."""
    if job == "b":
        os.kill(os.getpid(), 9)
    return f"ok {job}"


def test_a_killed_worker_fails_one_case_not_the_batch():
    results = sorted(preprocess.map_jobs(["a", "b", "c", "d"], 2, _die_on_b))
    assert results == ["b: its worker process died (killed, or out of memory)", "ok a", "ok c", "ok d"]


@pytest.mark.parametrize("labels, message", [
    ({"background": 0, "liver": 1, "spleen": 2}, None),                           # nnU-Net v2
    ({"background": 0, "liver": [1, 2], "tumour": 2}, r"region-based labels \(liver\)"),
    ("not json{", "not a valid dataset.json"),
])
def test_nnunet_v2_and_malformed_dataset_json(tmp_path, labels, message):
    path = tmp_path / "dataset.json"
    path.write_text(labels if isinstance(labels, str) else json.dumps({"labels": labels, "file_ending": ".nii.gz",
                                                                         "channel_names": {"0": "CT"}}))
    if message is None:
        assert preprocess.read_dataset_description(tmp_path) == ({"0": "background", "1": "liver", "2": "spleen"}, ["CT"])
    else:
        with pytest.raises(preprocess.PreprocessError, match=message) as e:
            preprocess.read_dataset_description(tmp_path)
        assert str(path) in str(e.value)


# ------------------------------------------------------------------ faults

def test_zero_length_axis_is_named(tmp_path):
    with pytest.raises(preprocess.PreprocessError, match=r"scan.nii.gz: an empty axis in shape \(20, 0, 8\)"):
        preprocess.validate_case(np.zeros((20, 0, 8), np.int16), AFFINE, names=("scan.nii.gz", "label"))


def test_output_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    raw = tmp_path / "raw"
    save(raw / "a.nii.gz", tiny_scan(np.random.default_rng(0))[0], AFFINE)
    (tmp_path / "a_file").write_text("not a folder")
    r = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), "--input", str(raw), "--output",
                        str(tmp_path / "a_file" / "out"), "--modality", "ct"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"preprocess.py: error: --output {tmp_path / 'a_file' / 'out'}: cannot create it (Not a directory)"
    assert (tmp_path / "a_file").read_text() == "not a folder"
    # a read-only folder (simulated: the tests may run as root, who may write anywhere)
    import runtime
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(runtime.os, "access", lambda p, mode: False if str(p).endswith("ro") else real_access(p, mode))
    with pytest.raises(ValueError, match=f"--output {tmp_path / 'ro'}: folder is not writable"):
        preprocess.main(args(input=str(raw), output=str(tmp_path / "ro")))
    assert list((tmp_path / "ro").iterdir()) == []


def test_stale_temp_files_are_removed_on_rerun(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    save(raw / "a.nii.gz", tiny_scan(np.random.default_rng(1))[0], AFFINE)
    preprocess.preprocess_folder(raw, out, "ct")
    stale = [out / ".tmp-123-dataset.json", out / "cases" / "a" / ".tmp-123-image.npy"]
    for path in stale:
        path.write_bytes(b"half a file")
    (out / "cases" / "a" / "notes.txt").write_text("the user's own file")     # not ours: kept
    assert preprocess.preprocess_folder(raw, out, "ct")["skipped"] == 1
    assert not any(p.exists() for p in stale)
    assert (out / "cases" / "a" / "notes.txt").read_text() == "the user's own file"


def _descendants(pid):
    """Every live process below pid (read from /proc: works with fork and forkserver)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                        # exited while we looked
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux-only")
def test_kill_worker_and_parent_mid_run_then_rerun(tmp_path):
    """The fault test: kill -9 one worker, then the parent, mid-batch. No process may outlive the
    parent, and a re-run must finish every case, equal to an undisturbed run, with no temp file."""
    import signal
    import time
    rng = np.random.default_rng(7)
    raw = tmp_path / "raw"
    for i in range(8):                      # big enough (~0.3 s a case) to be caught mid-run
        image, label = tiny_scan(rng, shape=(96, 90, 40))
        save(raw / "imagesTr" / f"c{i}.nii.gz", image, AFFINE)
        save(raw / "labelsTr" / f"c{i}.nii.gz", label, AFFINE)
    command = [sys.executable, str(ROOT / "preprocess.py"), "--input", str(raw), "--modality", "ct",
               "--workers", "2", "--output"]
    out = tmp_path / "out"
    parent = subprocess.Popen(command + [str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("cases/*/meta.json")):
        time.sleep(0.02)
    workers = _descendants(parent.pid)
    if workers:
        os.kill(workers[0], signal.SIGKILL)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() and
                                         "Z" not in Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1][:3]
                                         for w in workers):
        time.sleep(0.05)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()
             and Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert workers and not alive, f"workers {alive} outlived their parent"
    finished = len(list(out.glob("cases/*/meta.json")))
    assert finished < 8, "the run ended before it was killed: the test did not test a kill"

    rerun = subprocess.run(command + [str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"done {8 - finished} / skipped {finished} / failed 0" in rerun.stdout
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]
    assert subprocess.run(command + [str(tmp_path / "clean")], capture_output=True).returncode == 0
    assert json.loads((out / "dataset.json").read_text()) == json.loads((tmp_path / "clean" / "dataset.json").read_text())
    for i in range(8):
        meta, arrays = load_case(out, f"c{i}")
        clean_meta, clean = load_case(tmp_path / "clean", f"c{i}")
        assert meta == clean_meta and arrays.keys() == clean.keys()
        assert all(np.array_equal(arrays[k], clean[k]) for k in arrays)


# ------------------------------------------------------------------ several channels per case

def test_single_channel_preprocessing_is_unchanged(small_demo):
    """A demo case gives the same bytes as before multi-channel support (the files of demo case 0,
    seed 0, made by the code of commit aee7be1 with numpy 2.4)."""
    import hashlib
    before = {"image.npy": "2131fb15579f5dbc10ba3efa6f6656689e1afaba9c6314246b6712fd0065c492",
              "body.npy": "768c80579cbc1cc4cc94c5cd993f1d2792fe59efdbb8d982298a5d90da14dbca",
              "label.npy": "a3fb507674d44d61817c28e686440db787f1bcb5ce2220bbb0efea2309dc6cd0"}
    case = Path(small_demo) / "cases" / "demo_000"
    assert {name: hashlib.sha256((case / name).read_bytes()).hexdigest() for name in before} == before


@pytest.mark.parametrize("layout", ["nnunet", "decathlon"])
def test_two_channel_cases_each_channel_by_its_scheme(two_channel_raw, tmp_path, layout):
    """nnU-Net v2 (CASE_0000 + CASE_0001, channel_names) and Decathlon v1 (one 4-D image, modality):
    image.npy is (2, X, Y, Z) on one grid; the CT channel is exactly its single-channel CT
    preprocessing (the union of the channels' bodies has the CT body's box here), the T2 channel
    is percentile-scaled as an MRI channel; dataset.json records each channel's scheme."""
    result = preprocess.preprocess_folder(two_channel_raw[layout], tmp_path / "out", "ct")
    assert result["failed"] == [] and result["done"] == 4
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["channels"] == [dict(name="CT", scheme="ct"), dict(name="T2", scheme="mri")]
    meta, arrays = load_case(tmp_path / "out", "demo_001")
    assert arrays["image"].shape == (2, *meta["shape"]) and arrays["label"].shape == tuple(meta["shape"])
    ct, affine = preprocess.load_nifti(two_channel_raw["nnunet"] / "imagesTr" / "demo_001_0000.nii.gz")
    alone, body, _, alone_meta = preprocess.preprocess_arrays(ct, affine, "ct")
    assert alone_meta["crop_box"] == meta["crop_box"] and np.array_equal(body, body & arrays["body"])
    np.testing.assert_array_equal(arrays["image"][0], alone.astype(np.float16))
    t2 = arrays["image"][1].astype(np.float32)
    assert 0 <= t2.min() and t2.max() <= 1 and t2.std() > 0.05 and not np.allclose(t2, arrays["image"][0])


def test_a_missing_channel_or_another_grid_is_one_failed_line(two_channel_raw, tmp_path, capsys):
    import shutil
    raw = tmp_path / "raw"
    shutil.copytree(two_channel_raw["nnunet"], raw)
    (raw / "imagesTr" / "demo_002_0001.nii.gz").unlink()
    other = raw / "imagesTr" / "demo_003_0001.nii.gz"
    img = nib.load(other)
    short = np.asanyarray(img.dataobj)[:-1]
    nib.save(nib.Nifti1Image(short, img.affine), other)
    result = preprocess.preprocess_folder(raw, tmp_path / "out", "ct")
    assert result["done"] == 2 and sorted(result["failed"]) == [
        "imagesTr/demo_002: channel _0001 is missing (2 per case)",
        f"imagesTr/demo_003_0001.nii.gz: channel T2 is on another grid than imagesTr/demo_003_0000.nii.gz (shape "
        f"{short.shape} vs {img.shape}, or another affine)"]
    err = capsys.readouterr().err
    assert "FAILED imagesTr/demo_002: channel _0001 is missing" in err and "Traceback" not in err
