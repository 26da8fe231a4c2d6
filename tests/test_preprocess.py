"""Tests for preprocess.py: a folder of scans into one dataset (its layouts, bad cases as FAILED
lines, bugs with their tracebacks, re-runs by the raw files' identity, the run folder, killed
workers and parents, several channels), on tiny synthetic scans.

Run: python -m pytest -q tests/test_preprocess.py
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import preprocess  # noqa: E402
import transform  # noqa: E402
from data import InputError  # noqa: E402


# a permuted, flipped, anisotropic, translated affine (like DICOM-derived LPS data)
AFFINE = np.array([[0.0, -1.5, 0, 30], [0, 0, -1.5, 20], [3.0, 0, 0, -40], [0, 0, 0, 1]])


def args(**kw):
    base = dict(
        input=None,
        output=None,
        modality="ct",
        spacing=None,
        workers=1,
        demo=None,
        num_cases=20,
        seed=0,
        force=False,
        unlabelled_cases=0,
    )
    return argparse.Namespace(**{**base, **kw})


# ------------------------------------------------------------------ geometry


# ------------------------------------------------------------------ folders and bad input


def write_raw_folder(root, rng, tiny_scan, save_scan):
    """Decathlon layout: 3 good cases and one of each kind of bad input."""
    image, label = tiny_scan(rng)
    save_scan(root / "imagesTr" / "good_a.nii.gz", image, AFFINE)
    save_scan(root / "labelsTr" / "good_a.nii.gz", label, AFFINE)
    save_scan(root / "imagesTr" / "good_b_0000.nii.gz", image, AFFINE)  # nnU-Net channel suffix
    save_scan(root / "labelsTr" / "good_b.nii.gz", label, AFFINE)
    save_scan(root / "imagesTr" / "good_c.nii.gz", image[..., None], AFFINE)  # squeezable 4th dim
    save_scan(root / "labelsTr" / "good_c.nii.gz", label, AFFINE)
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
        "huge": (
            image,
            label,
            "GiB as float32 (limit 4.0 GiB); is the voxel size in the header right",
        ),
    }
    affines = {
        "singular": np.diag([1.5, 1.5, 0.0, 1.0]),
        "huge": np.diag([500.0, 500.0, 500.0, 1.0]),
    }
    expected = {}
    for name, (img, lab, message) in bad.items():
        affine = affines.get(name, AFFINE)
        if name == "singular":  # only an sform can hold it (a qform is a rotation): a rank-2 affine
            nifti = nib.Nifti1Image(img, None)
            nifti.set_sform(affine, code=1)
            nifti.set_qform(None, code=0)
            nib.save(nifti, str(root / "imagesTr" / f"{name}.nii.gz"))
        else:
            save_scan(root / "imagesTr" / f"{name}.nii.gz", img, affine)
        lab_affine = (
            AFFINE + np.eye(4, k=3) * 0.5
            if name == "affine"
            else AFFINE
            if name == "singular"
            else affine
        )
        save_scan(root / "labelsTr" / f"{name}.nii.gz", lab, lab_affine)
        folder = (
            "imagesTr" if name in ("four_d", "nan", "blank", "singular", "huge") else "labelsTr"
        )
        expected[f"{folder}/{name}.nii.gz"] = message
    blob = gzip.compress(nib.Nifti1Image(image, AFFINE).to_bytes())
    (root / "imagesTr" / "truncated.nii.gz").write_bytes(blob[: len(blob) // 2])
    save_scan(root / "labelsTr" / "truncated.nii.gz", label, AFFINE)
    (root / "imagesTr" / "garbage.nii").write_bytes(b"not a nifti file" * 40)
    save_scan(root / "labelsTr" / "garbage.nii.gz", label, AFFINE)
    save_scan(root / "imagesTr" / "no_label.nii.gz", image, AFFINE)
    save_scan(root / "imagesTr" / "good_b_0001.nii.gz", image, AFFINE)  # a second channel
    save_scan(root / "imagesTs" / "test_a.nii.gz", image, AFFINE)  # unlabelled test split
    save_scan(root / "labelsTr" / "no_image.nii.gz", label, AFFINE)
    expected.update(
        {
            "imagesTr/truncated.nii.gz": "unreadable or corrupt NIfTI",
            "imagesTr/garbage.nii": "unreadable or corrupt NIfTI",
            "imagesTr/no_label.nii.gz": "no label labelsTr/no_label.nii.gz",
            "imagesTr/good_b_0001.nii.gz": "channel _0001, but the dataset has 1 channel(s)",
            "labelsTr/no_image.nii.gz": "label without an image",
        }
    )
    return expected


def test_bad_inputs_reported_and_good_cases_finish(
    tmp_path, capsys, tiny_scan, save_scan, load_case
):
    expected = write_raw_folder(tmp_path / "raw", np.random.default_rng(4), tiny_scan, save_scan)
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
        ("good_a", "train"),
        ("good_b", "train"),
        ("good_c", "train"),
        ("test_a", "test"),
    ]
    assert info["labels"] == {"0": "background", "1": "class_1", "2": "class_2"}
    _, arrays = load_case(tmp_path / "out", "good_b")
    assert arrays["image"].dtype == np.float16 and arrays["label"].dtype == np.uint8


def test_empty_folder_is_fatal(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("no scans here")
    with pytest.raises(InputError, match="no .nii / .nii.gz files found"):
        preprocess.main(args(input=str(tmp_path / "raw"), output=str(tmp_path / "o")))
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "preprocess.py"),
            "--input",
            str(tmp_path / "raw"),
            "--output",
            str(tmp_path / "o"),
            "--modality",
            "ct",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "no .nii / .nii.gz files found" in run.stderr


def test_rerun_skips_finished_cases_and_leaves_no_temp_files(
    tmp_path, capsys, tiny_scan, save_scan
):
    rng = np.random.default_rng(5)
    for name in ("a", "b", "c"):
        image, label = tiny_scan(rng)
        save_scan(tmp_path / "raw" / "imagesTr" / f"{name}.nii.gz", image, AFFINE)
        save_scan(tmp_path / "raw" / "labelsTr" / f"{name}.nii.gz", label, AFFINE)
    raw, out = tmp_path / "raw", tmp_path / "out"
    assert preprocess.preprocess_folder(raw, out, "ct", workers=2)["done"] == 3
    (out / "cases" / "b" / "meta.json").unlink()  # as if killed before the case finished
    result = preprocess.preprocess_folder(raw, out, "ct", workers=1)
    assert (result["done"], result["skipped"], result["failed"]) == (1, 2, [])
    assert "done 1 / skipped 2 / failed 0" in capsys.readouterr().out
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]
    assert len(json.loads((out / "dataset.json").read_text())["cases"]) == 3
    # another spacing is another preset: refused without --force (its cases would be replaced) ...
    with pytest.raises(
        InputError, match=r"holds a run with other settings \(--preset .*spacing.*pass --force"
    ):
        preprocess.preprocess_folder(raw, out, "ct", spacing=(2, 2, 4))
    # ... and with it, nothing is skipped
    assert (
        preprocess.preprocess_folder(raw, out, "ct", spacing=(2, 2, 4), force=True)["skipped"] == 0
    )


def test_flat_folder_is_unlabelled(tmp_path, tiny_scan, save_scan):
    rng = np.random.default_rng(6)
    for name in ("scan1.nii.gz", "scan2.nii", "scan2.nii.gz"):
        save_scan(tmp_path / "raw" / name, tiny_scan(rng)[0], AFFINE)
    result = preprocess.preprocess_folder(tmp_path / "raw", tmp_path / "out", "ct")
    assert result["done"] == 2
    assert result["failed"] == ["scan2.nii.gz: duplicate case id 'scan2'"]
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["labels"] is None
    assert [(c["id"], c["split"], c["labelled"]) for c in info["cases"]] == [
        ("scan1", "unlabelled", False),
        ("scan2", "unlabelled", False),
    ]
    assert not (tmp_path / "out" / "cases" / "scan1" / "label.npy").exists()


def test_output_inside_input_is_refused(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "dataset.json").write_text('{"labels": {"0": "background"}}')
    before = (raw / "dataset.json").read_bytes()
    for out in (raw, raw / "pre"):
        with pytest.raises(InputError, match="is \\(inside\\) --input"):
            preprocess.main(args(input=str(raw), output=str(out)))
    assert (raw / "dataset.json").read_bytes() == before and not (raw / "pre").exists()


@pytest.mark.parametrize("spacing", [[float("nan"), 1, 1], [0, 1, 1], [-1, 1, 2]])
def test_bad_spacing_fails_at_parse_time(tmp_path, capsys, spacing):
    with pytest.raises(SystemExit) as e:
        preprocess.parse_args(
            [
                "--input",
                str(tmp_path),
                "--output",
                str(tmp_path / "o"),
                "--modality",
                "ct",
                "--spacing",
                *map(str, spacing),
            ]
        )
    assert e.value.code == 2 and "argument --spacing: must be" in capsys.readouterr().err


def _die_on_b(job):
    """A worker that is killed (as the out-of-memory killer would) on case 'b'."""
    if job == "b":
        os.kill(os.getpid(), 9)
    return f"ok {job}"


def test_a_killed_worker_fails_one_case_not_the_batch():
    results = sorted(preprocess.map_jobs(["a", "b", "c", "d"], 2, _die_on_b))
    assert results == [
        "b: its worker process died (killed, or out of memory)",
        "ok a",
        "ok c",
        "ok d",
    ]


# ------------------------------------------------------------------ faults


def test_output_that_cannot_be_written_is_one_line(
    tmp_path, capsys, monkeypatch, tiny_scan, save_scan
):
    raw = tmp_path / "raw"
    save_scan(raw / "a.nii.gz", tiny_scan(np.random.default_rng(0))[0], AFFINE)
    (tmp_path / "a_file").write_text("not a folder")
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "preprocess.py"),
            "--input",
            str(raw),
            "--output",
            str(tmp_path / "a_file" / "out"),
            "--modality",
            "ct",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        == f"preprocess.py: error: --output {tmp_path / 'a_file' / 'out'}: cannot be a folder "
        "(Not a directory)"
    )
    assert (tmp_path / "a_file").read_text() == "not a folder"
    # a read-only folder (simulated: the tests may run as root, who may write anywhere)
    import runtime

    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        runtime.os,
        "access",
        lambda p, mode: False if str(p).endswith("ro") else real_access(p, mode),
    )
    with pytest.raises(InputError, match=f"--output {tmp_path / 'ro'}: folder is not writable"):
        preprocess.main(args(input=str(raw), output=str(tmp_path / "ro")))
    assert list((tmp_path / "ro").iterdir()) == []


def test_stale_temp_files_are_removed_on_rerun(tmp_path, tiny_scan, save_scan):
    raw, out = tmp_path / "raw", tmp_path / "out"
    save_scan(raw / "a.nii.gz", tiny_scan(np.random.default_rng(1))[0], AFFINE)
    preprocess.preprocess_folder(raw, out, "ct")
    stale = [out / ".tmp.dataset.json", out / "cases" / "a" / ".tmp.image.npy"]  # of recorded files
    for path in stale:
        path.write_bytes(b"half a file")
    mine = [
        out / "cases" / "a" / "notes.txt",
        out / ".tmp-123-dataset.json",
    ]  # no record lists them
    for path in mine:
        path.write_text("the user's own file")
    assert preprocess.preprocess_folder(raw, out, "ct")["skipped"] == 1
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "the user's own file" for p in mine)


def test_a_case_whose_raw_file_changed_is_redone(tmp_path, tiny_scan, save_scan, load_case):
    """A re-run skips a case only if its raw files are the ones it was made from (their size and
    time, recorded in its meta.json): a scan replaced under the same name is preprocessed again,
    with or without --force; the others are skipped."""
    rng = np.random.default_rng(8)
    raw, out = tmp_path / "raw", tmp_path / "out"
    for name in ("a", "b"):
        save_scan(raw / f"{name}.nii.gz", tiny_scan(rng)[0], AFFINE)
    preprocess.preprocess_folder(raw, out, "ct")
    before = load_case(out, "a")[1]["image"]
    save_scan(
        raw / "a.nii.gz", tiny_scan(rng, shape=(24, 18, 8))[0], AFFINE
    )  # another scan, same name
    result = preprocess.preprocess_folder(raw, out, "ct")
    assert (result["done"], result["skipped"]) == (1, 1)
    assert load_case(out, "a")[1]["image"].shape != before.shape
    import os

    os.utime(raw / "b.nii.gz")  # touched: redone too
    assert preprocess.preprocess_folder(raw, out, "ct")["done"] == 1


def test_an_output_holds_one_dataset(tmp_path, tiny_scan, save_scan):
    """A second --input into an output that holds another dataset is refused (it would merge two
    datasets into one dataset.json); with --force the earlier run's files go first."""
    rng = np.random.default_rng(9)
    for raw in ("raw1", "raw2"):
        save_scan(tmp_path / raw / f"{raw}_scan.nii.gz", tiny_scan(rng)[0], AFFINE)
    preprocess.preprocess_folder(tmp_path / "raw1", tmp_path / "out", "ct")
    with pytest.raises(
        InputError, match=r"holds a run with other settings \(--input \S+raw1 -> \S+raw2\)"
    ):
        preprocess.preprocess_folder(tmp_path / "raw2", tmp_path / "out", "ct")
    preprocess.preprocess_folder(tmp_path / "raw2", tmp_path / "out", "ct", force=True)
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert [c["id"] for c in info["cases"]] == ["raw2_scan"] and not (
        tmp_path / "out" / "cases" / "raw1_scan"
    ).exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bug_stops_the_run_with_its_traceback(
    tmp_path, tiny_scan, save_scan, monkeypatch, workers
):
    """Bad input is a FAILED line; a bug in the per-case code (here a KeyError injected into it) is
    not blamed on a scan: the run stops and the exception, with its file and line, reaches the
    caller, from a worker process too."""
    rng = np.random.default_rng(10)
    for name in ("a", "b", "c"):
        save_scan(tmp_path / "raw" / f"{name}.nii.gz", tiny_scan(rng)[0], AFFINE)

    def broken(*args, **kwargs):
        return {}["a key the code forgot"]

    monkeypatch.setattr(preprocess, "preprocess_arrays", broken)  # forked workers inherit it
    with pytest.raises(KeyError, match="a key the code forgot"):
        preprocess.preprocess_folder(tmp_path / "raw", tmp_path / "out", "ct", workers=workers)


def _descendants(pid):
    """Every live process below pid (read from /proc: works with fork and forkserver)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux-only"
)
def test_kill_worker_and_parent_mid_run_then_rerun(tmp_path, tiny_scan, save_scan, load_case):
    """The fault test: kill -9 one worker, then the parent, mid-batch. No process may outlive the
    parent, and a re-run must finish every case, equal to an undisturbed run, with no temp file."""
    import signal
    import time

    rng = np.random.default_rng(7)
    raw = tmp_path / "raw"
    for i in range(8):  # big enough (~0.3 s a case) to be caught mid-run
        image, label = tiny_scan(rng, shape=(96, 90, 40))
        save_scan(raw / "imagesTr" / f"c{i}.nii.gz", image, AFFINE)
        save_scan(raw / "labelsTr" / f"c{i}.nii.gz", label, AFFINE)
    command = [
        sys.executable,
        str(ROOT / "preprocess.py"),
        "--input",
        str(raw),
        "--modality",
        "ct",
        "--workers",
        "2",
        "--output",
    ]
    out = tmp_path / "out"
    parent = subprocess.Popen(
        command + [str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("cases/*/meta.json")):
        time.sleep(0.02)
    workers = _descendants(parent.pid)
    if workers:
        os.kill(workers[0], signal.SIGKILL)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(
        Path(f"/proc/{w}").exists()
        and "Z" not in Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1][:3]
        for w in workers
    ):
        time.sleep(0.05)
    alive = [
        w
        for w in workers
        if Path(f"/proc/{w}").exists()
        and Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    ]
    assert workers and not alive, f"workers {alive} outlived their parent"
    finished = len(list(out.glob("cases/*/meta.json")))
    assert finished < 8, "the run ended before it was killed: the test did not test a kill"

    rerun = subprocess.run(command + [str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"done {8 - finished} / skipped {finished} / failed 0" in rerun.stdout
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]
    assert subprocess.run(command + [str(tmp_path / "clean")], capture_output=True).returncode == 0
    assert json.loads((out / "dataset.json").read_text()) == json.loads(
        (tmp_path / "clean" / "dataset.json").read_text()
    )
    for i in range(8):
        meta, arrays = load_case(out, f"c{i}")
        clean_meta, clean = load_case(tmp_path / "clean", f"c{i}")
        # noqa: E731 (arrays: their times)
        when = lambda m: {k: v for k, v in m.items() if k != "arrays"}
        assert when(meta) == when(clean_meta) and arrays.keys() == clean.keys()
        assert all(np.array_equal(arrays[k], clean[k]) for k in arrays)


# ------------------------------------------------------------------ several channels per case


def test_single_channel_preprocessing_is_unchanged(small_demo):
    """A demo case gives the same bytes as before multi-channel support (the files of demo case 0,
    seed 0, made by the code of commit aee7be1 with numpy 2.4)."""
    import hashlib

    before = {
        "image.npy": "2131fb15579f5dbc10ba3efa6f6656689e1afaba9c6314246b6712fd0065c492",
        "body.npy": "768c80579cbc1cc4cc94c5cd993f1d2792fe59efdbb8d982298a5d90da14dbca",
        "label.npy": "a3fb507674d44d61817c28e686440db787f1bcb5ce2220bbb0efea2309dc6cd0",
    }
    case = Path(small_demo) / "cases" / "demo_000"
    assert {
        name: hashlib.sha256((case / name).read_bytes()).hexdigest() for name in before
    } == before


@pytest.mark.parametrize("layout", ["nnunet", "decathlon"])
def test_two_channel_cases_each_channel_by_its_scheme(two_channel_raw, tmp_path, layout, load_case):
    """nnU-Net v2 (CASE_0000 + CASE_0001, channel_names) and Decathlon v1 (one 4-D image, modality):
    image.npy is (2, X, Y, Z) on one grid; the CT channel is exactly its single-channel CT
    preprocessing (the union of the channels' bodies has the CT body's box here), the T2 channel
    is percentile-scaled as an MRI channel; dataset.json records each channel's scheme."""
    result = preprocess.preprocess_folder(two_channel_raw[layout], tmp_path / "out", "ct")
    assert result["failed"] == [] and result["done"] == 4
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["channels"] == [dict(name="CT", scheme="ct"), dict(name="T2", scheme="mri")]
    meta, arrays = load_case(tmp_path / "out", "demo_001")
    assert arrays["image"].shape == (2, *meta["shape"]) and arrays["label"].shape == tuple(
        meta["shape"]
    )
    ct, affine = transform.load_nifti(
        two_channel_raw["nnunet"] / "imagesTr" / "demo_001_0000.nii.gz"
    )
    alone, body, _, alone_meta = transform.preprocess_arrays(ct, affine, "ct")
    assert alone_meta["crop_box"] == meta["crop_box"] and np.array_equal(
        body, body & arrays["body"]
    )
    np.testing.assert_array_equal(arrays["image"][0], alone.astype(np.float16))
    t2 = arrays["image"][1].astype(np.float32)
    assert (
        0 <= t2.min()
        and t2.max() <= 1
        and t2.std() > 0.05
        and not np.allclose(t2, arrays["image"][0])
    )


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
        "imagesTr/demo_003_0001.nii.gz: channel T2 is on another grid than "
        f"imagesTr/demo_003_0000.nii.gz (shape {short.shape} vs {img.shape}, or another affine)",
    ]
    err = capsys.readouterr().err
    assert "FAILED imagesTr/demo_002: channel _0001 is missing" in err and "Traceback" not in err
