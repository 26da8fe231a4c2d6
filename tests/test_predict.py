"""predict.py: the fold ensemble and the mirroring against naive loops, world-space agreement for
a scan stored with other axes, probabilities that sum to 1, one corrupt scan among good ones,
skip / --force, a model replaced under the same name redoing the cases it made, the refusals
(output inside the input, mismatched models), and a mask on the scan's own grid."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import data
import downstream
import predict
import preprocess
import transform
import weights
from model import SegmentationModel
from data import InputError

BACKBONE = dict(in_channels=1, base_channels=4, num_levels=3)
PATCH = (32, 32, 16)


def make_run(folder, small_demo, folds=(0, 1, 2), aug="nnunet-like", num_classes=9, seed=0):
    """A finetune.py-style run folder of untrained models (each fold its own random weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = data.read_dataset(small_demo)[1]
    names = {int(k): v for k, v in info["labels"].items()}
    if num_classes != len(names):
        names = {k: f"class{k}" for k in range(num_classes)}
    for fold in folds:
        torch.manual_seed(seed + fold)
        model = SegmentationModel(BACKBONE, num_classes, head="nonlinear")
        with torch.no_grad():  # BatchNorm statistics that are not the identity
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm3d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        meta = info
        weights.save_segmenter(
            folder / f"model_fold{fold}.pt",
            model,
            labels={str(k): v for k, v in names.items()},
            modality=meta["modality"],
            preset=meta["preset"],
            patch_size=list(PATCH),
            aug=aug,
            mirror_axes=[0, 1, 2] if aug != "none" else [],
            fold=fold,
            train_cases=["x"],
        )
    return folder


@pytest.fixture(scope="module")
def run_dir(small_demo, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"), small_demo)


@pytest.fixture(scope="module")
def scans(small_demo, tmp_path_factory):
    """Two demo scans, Decathlon test naming (case_0000.nii.gz)."""
    folder = tmp_path_factory.mktemp("scans")
    for src in sorted((Path(small_demo) / "raw" / "imagesTr").iterdir())[:2]:
        shutil.copy(src, folder / src.name.replace(".nii.gz", "_0000.nii.gz"))
    return folder


def run(*argv):
    return predict.main(predict.parse_args([str(a) for a in argv]))


def image01(small_demo, case=0):
    scan = sorted((Path(small_demo) / "raw" / "imagesTr").iterdir())[case]
    image, affine = transform.load_nifti(scan)
    return transform.preprocess_arrays(image, affine, "ct")[0][None]  # (1, X, Y, Z)


def test_ensemble_is_the_mean_of_the_single_models(run_dir, small_demo):
    models, ckpts = predict.load_ensemble(predict.find_models(run_dir))
    x = image01(small_demo)
    cpu = torch.device("cpu")
    ensemble = predict.ensemble_probabilities(models, [PATCH] * 3, x, cpu)
    singles = [downstream.volume_probabilities(m, x, PATCH, cpu) for m in models]
    torch.testing.assert_close(ensemble, sum(singles) / 3, atol=1e-6, rtol=0)
    assert not torch.allclose(singles[0], singles[1], atol=1e-3)  # the models differ


def test_mirroring_is_the_mean_over_the_eight_flips(run_dir, small_demo):
    models, _ = predict.load_ensemble(predict.find_models(run_dir, [0]))
    x = torch.as_tensor(image01(small_demo))
    cpu = torch.device("cpu")
    tta = predict.ensemble_probabilities(models, [PATCH], x, cpu, mirror_axes=(0, 1, 2))
    naive = []
    for fx in (False, True):
        for fy in (False, True):
            for fz in (False, True):
                dims = [d for d, f in zip((1, 2, 3), (fx, fy, fz)) if f]  # (C, X, Y, Z): X is dim 1
                p = downstream.volume_probabilities(
                    models[0], x.flip(dims) if dims else x, PATCH, cpu
                )
                naive.append(p.flip(dims) if dims else p)
    assert len(naive) == 8
    torch.testing.assert_close(tta, sum(naive) / 8, atol=1e-6, rtol=0)
    plain = predict.ensemble_probabilities(models, [PATCH], x, cpu)
    assert not torch.allclose(tta, plain, atol=1e-4)  # a random net is not mirror-symmetric


def test_scan_with_other_axes_gives_the_same_mask_in_world_space(run_dir, small_demo, tmp_path):
    scan = sorted((Path(small_demo) / "raw" / "imagesTr").iterdir())[0]
    img = nib.load(scan)
    data = np.asanyarray(img.dataobj)
    # the same scan stored with axes 0 and 2 swapped and axis 1 flipped: another voxel order, same
    # world
    perm = np.array(
        [[0, 0, 1, 0], [0, -1, 0, data.shape[1] - 1], [1, 0, 0, 0], [0, 0, 0, 1]], float
    )
    other = nib.Nifti1Image(
        np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, :]), img.affine @ np.linalg.inv(perm)
    )
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(scan, inputs / "a.nii.gz")
    nib.save(other, inputs / "b.nii.gz")
    assert run("-i", inputs, "-o", tmp_path / "out", "--model", run_dir, "--no-tta") == 0
    a, b = (nib.as_closest_canonical(nib.load(tmp_path / "out" / f"{n}.nii.gz")) for n in "ab")
    assert np.allclose(a.affine, b.affine)
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert nib.load(tmp_path / "out" / "b.nii.gz").shape == other.shape


def test_outputs_probabilities_and_report(run_dir, scans, tmp_path):
    out = tmp_path / "out"
    assert (
        run("-i", scans, "-o", out, "--model", run_dir, "--save-probabilities", "--folds", "0", "2")
        == 0
    )
    report = json.loads((out / "predictions.json").read_text())
    assert report["tta"] is True and [Path(m).name for m in report["models"]] == [
        "model_fold0.pt",
        "model_fold2.pt",
    ]
    names = sorted(report["cases"])
    assert names == sorted(
        p.name.replace("_0000.nii.gz", "") for p in scans.iterdir()
    )  # _0000 dropped
    classes = json.loads((out / "classes.json").read_text())
    for name in names:
        record = report["cases"][name]
        assert record["status"] == "done" and record["seconds"] > 0
        seg = nib.load(out / f"{name}.nii.gz")
        scan = nib.load(scans / f"{name}_0000.nii.gz")
        assert seg.shape == scan.shape and np.allclose(seg.affine, scan.affine)
        with np.load(out / f"{name}.npz") as f:  # no pickle needed
            probs, listed = f["probabilities"], list(f["classes"])
        assert probs.dtype == np.float16 and probs.shape == (len(classes), *scan.shape)
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
        assert listed == list(classes.values())
        labels = np.asanyarray(seg.dataobj)
        assert sum(record["voxels_per_class"].values()) == labels.size
        assert record["voxels_per_class"][classes["0"]] == int((labels == 0).sum())


def test_a_corrupt_scan_fails_alone_then_rerun_skips_and_force_redoes(run_dir, scans, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(scans, inputs)
    (inputs / "broken_0000.nii.gz").write_bytes(b"not a nifti at all")
    out = tmp_path / "out"
    assert run("-i", inputs, "-o", out, "--model", run_dir, "--no-tta") == 1
    cases = json.loads((out / "predictions.json").read_text())["cases"]
    assert cases["broken"]["status"] == "failed" and "\n" not in cases["broken"]["reason"]
    assert "broken_0000.nii.gz" in cases["broken"]["reason"]
    good = [n for n in cases if n != "broken"]
    assert len(good) == 2 and all(cases[n]["status"] == "done" for n in good)
    assert not list(out.glob(".tmp*"))
    (inputs / "broken_0000.nii.gz").unlink()
    stamps = {n: (out / f"{n}.nii.gz").stat().st_mtime_ns for n in good}
    assert run("-i", inputs, "-o", out, "--model", run_dir, "--no-tta") == 0
    cases = json.loads((out / "predictions.json").read_text())["cases"]
    assert all(cases[n]["status"] == "skipped" for n in good)
    assert all((out / f"{n}.nii.gz").stat().st_mtime_ns == stamps[n] for n in good)
    assert run("-i", inputs, "-o", out, "--model", run_dir, "--no-tta", "--force") == 0
    cases = json.loads((out / "predictions.json").read_text())["cases"]
    assert all(cases[n]["status"] == "done" for n in good)
    assert all((out / f"{n}.nii.gz").stat().st_mtime_ns != stamps[n] for n in good)


def test_decathlon_folder_and_single_file_inputs(run_dir, scans, tmp_path):
    root = tmp_path / "Task"
    shutil.copytree(scans, root / "imagesTs")
    assert [n for n, _ in predict.find_scans(root)] == sorted(
        p.name.replace("_0000.nii.gz", "") for p in scans.iterdir()
    )
    one = sorted(scans.iterdir())[0]
    assert run("-i", one, "-o", tmp_path / "single", "--model", run_dir / "model_fold1.pt") == 0
    assert (tmp_path / "single" / one.name.replace("_0000", "")).is_file()


def test_default_mirroring_follows_the_training_augmentation(small_demo, tmp_path):
    plain = make_run(tmp_path / "plain", small_demo, folds=(0,), aug="none")
    _, ckpts = predict.load_ensemble(predict.find_models(plain))
    assert predict.trained_mirror_axes(ckpts) == ()


@pytest.mark.parametrize(
    "problem",
    [
        "output_is_input",
        "output_inside_input",
        "labels_differ",
        "missing_fold",
        "no_models",
        "bad_overlap",
    ],
)
def test_refused_before_any_work(run_dir, scans, small_demo, tmp_path, problem, capsys):
    model, out, extra = run_dir, tmp_path / "out", []
    if problem == "output_is_input":
        out = scans
    elif problem == "output_inside_input":
        out = scans / "pred"
    elif problem == "labels_differ":
        model = tmp_path / "mixed"
        make_run(model, small_demo, folds=(0,))
        make_run(tmp_path / "other", small_demo, folds=(1,), num_classes=3)
        shutil.copy(tmp_path / "other" / "model_fold1.pt", model / "model_fold1.pt")
    elif problem == "missing_fold":
        extra = ["--folds", "0", "7"]
    elif problem == "no_models":
        model = tmp_path / "empty"
        model.mkdir()
    elif problem == "bad_overlap":
        extra = ["--overlap", "1"]
    before = sorted(p.name for p in scans.iterdir())
    if problem == "bad_overlap":  # where it is parsed: argparse's line, exit 2
        with pytest.raises(SystemExit) as e:
            run("-i", scans, "-o", out, "--model", model, *extra)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
    else:
        with pytest.raises(InputError) as e:
            run("-i", scans, "-o", out, "--model", model, *extra)
        err = str(e.value)
        assert "\n" not in err
    expected = {
        "output_is_input": "is (inside) -i",
        "output_inside_input": "is (inside) -i",
        "labels_differ": "labels differs",
        "missing_fold": "--folds 7",
        "no_models": "no model_fold",
        "bad_overlap": "argument --overlap: must be in [0, 1)",
    }[problem]
    assert expected in err
    assert sorted(p.name for p in scans.iterdir()) == before
    assert not (out / "predictions.json").exists()
    assert (
        problem == "output_is_input"
        or not out.exists()
        or {p.name for p in out.iterdir()} <= {".run.json", ".lock"}
    )


def test_a_model_replaced_under_the_same_name_redoes_its_cases(small_demo, scans, tmp_path):
    """The prediction records every model file's size and time: after a model is replaced
    (finetune.py --force into the same folder), a re-run into the earlier prediction folder is
    refused naming the file, and with --force every case is redone by the new model, never
    skipped as if current."""
    models = make_run(tmp_path / "models", small_demo, folds=(0,))
    out = tmp_path / "pred"
    assert run("-i", scans, "-o", out, "--model", models, "--no-tta") == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.nii.gz")}
    assert (
        run("-i", scans, "-o", out, "--model", models, "--no-tta") == 0
    )  # same models: continued, skipped
    assert all(
        r["status"] == "skipped"
        for r in json.loads((out / "predictions.json").read_text())["cases"].values()
    )
    make_run(
        tmp_path / "models", small_demo, folds=(0,), seed=5
    )  # another model, the same file name
    with pytest.raises(
        InputError, match=r"-o .* holds a run that read other inputs: .*model_fold0.pt changed"
    ):
        run("-i", scans, "-o", out, "--model", models, "--no-tta")
    assert {p.name: p.read_bytes() for p in out.glob("*.nii.gz")} == first
    assert run("-i", scans, "-o", out, "--model", models, "--no-tta", "--force") == 0
    cases = json.loads((out / "predictions.json").read_text())["cases"]
    assert all(r["status"] == "done" for r in cases.values())
    assert {p.name: p.read_bytes() for p in out.glob("*.nii.gz")} != first


def test_predict_needs_a_finetuned_checkpoint(small_demo, tmp_path):
    import pretrain

    pretrain.main(
        pretrain.parse_args(
            [
                "--data",
                str(small_demo),
                "--out",
                str(tmp_path / "pre"),
                "--steps",
                "1",
                "--base-channels",
                "4",
                "--num-levels",
                "3",
                "--patch-size",
                "16",
                "16",
                "8",
                "--batch-pairs",
                "2",
                "--num-voxels",
                "16",
                "--workers",
                "0",
            ]
        )
    )
    scan = sorted((Path(small_demo) / "raw" / "imagesTr").iterdir())[0]
    with pytest.raises(
        InputError, match=r"is a pretrained backbone \(pretrain.py\), not a fine-tuned model"
    ):
        run("-i", scan, "-o", tmp_path / "o", "--model", tmp_path / "pre" / "backbone.pt")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(InputError, match="a text file") as e:
        run("-i", scan, "-o", tmp_path / "o", "--model", notes)
    assert "weights_only=False" not in str(e.value)
    assert {p.name for p in (tmp_path / "o").iterdir()} <= {
        ".run.json",
        ".lock",
    }  # claimed, nothing written


@pytest.mark.parametrize("problem", ["output_is_the_scan", "output_is_a_file"])
def test_predict_checks_its_output_before_any_work(small_demo, tmp_path, problem, monkeypatch):
    scan = sorted((Path(small_demo) / "raw" / "imagesTr").iterdir())[0]
    copy = tmp_path / "in" / scan.name
    copy.parent.mkdir()
    shutil.copy(scan, copy)
    (tmp_path / "taken.txt").write_text("mine")
    before = copy.read_bytes()
    output = {"output_is_the_scan": copy, "output_is_a_file": tmp_path / "taken.txt"}[problem]
    monkeypatch.setattr(
        predict,
        "load_segmenter",
        lambda *a: pytest.fail("work started before the output was checked"),
    )
    (tmp_path / "model_fold0.pt").write_text("never read")
    with pytest.raises(InputError) as e:
        run("-i", copy, "-o", output, "--model", tmp_path)
    assert str(output) in str(e.value) and "\n" not in str(e.value)
    assert copy.read_bytes() == before and (tmp_path / "taken.txt").read_text() == "mine"
    assert not list(tmp_path.rglob(".tmp*"))


def test_predict_writes_mask_on_the_original_grid(small_demo, tmp_path, monkeypatch):
    models = make_run(tmp_path / "models", small_demo, folds=(0,), aug="none")
    raw = Path(small_demo) / "raw"
    scan = sorted((raw / "imagesTr").iterdir())[0]
    label_file = raw / "labelsTr" / scan.name.replace("_0000", "")
    out = tmp_path / "pred"
    seg = out / scan.name
    predict_one = lambda *extra: run(
        "-i", scan, "-o", out, "--model", models / "model_fold0.pt", *extra
    )  # noqa: E731
    assert predict_one() == 0
    written, original = nib.load(seg), nib.load(label_file)
    assert written.shape == original.shape and np.allclose(written.affine, original.affine)

    # Alignment: with an oracle in place of the network (the preprocessed label itself), the
    # mask that predict.py writes must coincide with the label on the scan's own grid.
    image, affine = transform.load_nifti(scan)
    label = np.asanyarray(original.dataobj)
    _, _, label_pre, meta = transform.preprocess_arrays(image, affine, "ct", label=label)
    oracle = (
        torch.nn.functional.one_hot(torch.as_tensor(label_pre.astype(np.int64)), 9)
        .permute(3, 0, 1, 2)
        .float()
    )
    monkeypatch.setattr(predict, "ensemble_probabilities", lambda *a, **k: oracle)
    before = seg.read_bytes()
    assert (
        predict_one() == 0 and seg.read_bytes() == before
    )  # no silent overwrite: the case is skipped
    assert predict_one("--force") == 0
    pred = np.asanyarray(nib.load(seg).dataobj)
    # exactly the nearest-neighbour round trip of the label (the best any network could do) ...
    np.testing.assert_array_equal(pred, transform.to_original_grid(label_pre, meta))
    # ... which lies on the label: the round trip 0.86 -> 1 -> 0.86 mm loses boundary voxels of
    # the demo's few-voxel-thick organs (test_preprocess), while a one-voxel shift or a flipped
    # axis would lose far more.
    fg = [c for c in np.unique(label) if c]
    dice = [
        2 * np.sum((pred == c) & (label == c)) / (np.sum(pred == c) + np.sum(label == c))
        for c in fg
    ]
    assert np.mean(dice) >= 0.9 and min(dice) >= 0.85, dice


@pytest.mark.parametrize("layout", ["nnunet", "decathlon"])
def test_two_channel_scans_from_preprocess_to_a_mask(
    two_channel_raw, small_demo, tmp_path, layout, capsys
):
    """A 2-channel dataset (nnU-Net v2 files, or Decathlon v1 4-D images) goes through preprocess ->
    fine-tuning from the single-channel demo backbone (its stem repeated over the 2 channels) ->
    predict, one mask per case on the scan's grid; the comparison line names the MRI-normalised
    channel; a case with the wrong number of channel files fails alone."""
    import finetune
    import pretrain

    data_dir = tmp_path / "data"
    preprocess.preprocess_folder(two_channel_raw[layout], data_dir, "ct")
    pretrain.main(
        pretrain.parse_args(
            [
                "--data",
                str(small_demo),
                "--out",
                str(tmp_path / "pre"),
                "--steps",
                "1",
                "--preset",
                "demo",
                "--patch-size",
                "16",
                "16",
                "8",
                "--batch-pairs",
                "2",
                "--num-voxels",
                "16",
                "--workers",
                "0",
            ]
        )
    )
    capsys.readouterr()
    results = finetune.main(
        finetune.parse_args(
            [
                "--data",
                str(data_dir),
                "--checkpoint",
                str(tmp_path / "pre"),
                "--out",
                str(tmp_path / "ft"),
                "--preset",
                "demo",
                "--steps",
                "2",
                "--batch-size",
                "1",
                "--patch-size",
                "16",
                "16",
                "8",
                "--workers",
                "0",
                "--bn-batches",
                "1",
                "--freeze-steps",
                "1",
                "--ramp-steps",
                "1",
                "--eval-patch-size",
                "64",
                "64",
                "32",
                "--folds",
                "2",
                "--fold",
                "0",
            ]
        )
    )
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("preprocessing:"))
    assert (
        "labelled set CT (ct) + T2 (mri)" in line
        and "channel T2 is MRI-normalised, the backbone saw CT" in line
    )
    assert results["data_preprocessing"]["channels"][1] == dict(name="T2", scheme="mri")
    assert results["backbone_preprocessing"]["channels"] == [dict(name="CT", scheme="ct")]
    model, record = weights.load_segmenter(tmp_path / "ft" / "model_fold0.pt")
    assert model.backbone.in_channels == 2 and [c["name"] for c in record["channels"]] == [
        "CT",
        "T2",
    ]
    scans = tmp_path / "scans"
    shutil.copytree(two_channel_raw[layout] / "imagesTr", scans)
    if layout == "nnunet":
        (scans / "demo_003_0001.nii.gz").unlink()  # one channel short: 1 file is no 4-D image
    assert run("-i", scans, "-o", tmp_path / "pred", "--model", tmp_path / "ft", "--no-tta") == (
        1 if layout == "nnunet" else 0
    )
    cases = json.loads((tmp_path / "pred" / "predictions.json").read_text())["cases"]
    assert sorted(cases) == ["demo_000", "demo_001", "demo_002", "demo_003"]
    for name, record in cases.items():
        if layout == "nnunet" and name == "demo_003":
            assert (
                record["status"] == "failed"
                and "expected 2 channels along its 4th axis" in record["reason"]
            )
            continue
        raw = two_channel_raw[layout] / "labelsTr" / f"{name}.nii.gz"
        mask = nib.load(tmp_path / "pred" / f"{name}.nii.gz")
        assert record["status"] == "done" and mask.shape == nib.load(raw).shape
    wrong = tmp_path / "wrong"
    shutil.copytree(two_channel_raw[layout], wrong)
    names = json.loads((wrong / "dataset.json").read_text())
    names["channel_names" if layout == "nnunet" else "modality"]["1"] = "ADC"
    (wrong / "dataset.json").write_text(json.dumps(names))
    with pytest.raises(
        InputError,
        match=r"names the channels \['CT', 'ADC'\], the models were trained on \['CT', 'T2'\]",
    ):
        run("-i", wrong / "imagesTr", "-o", tmp_path / "pred2", "--model", tmp_path / "ft")


def test_a_scan_replaced_under_its_name_is_redone(run_dir, scans, tmp_path):
    """A re-run skips a case only if its scan is the one its mask was made from (the identity,
    size and time, predictions.json keeps): a scan replaced under the same name is predicted
    again, onto its own grid; the others are skipped."""
    inputs = tmp_path / "in"
    shutil.copytree(scans, inputs)
    out = tmp_path / "out"
    assert run("-i", inputs, "-o", out, "--model", run_dir, "--no-tta", "--folds", "0") == 0
    first, second = sorted(p.name for p in inputs.iterdir())
    img = nib.load(inputs / first)
    cropped = np.asanyarray(img.dataobj)[:-3]  # another scan: three slices fewer
    nib.save(nib.Nifti1Image(cropped, img.affine), inputs / first)
    assert run("-i", inputs, "-o", out, "--model", run_dir, "--no-tta", "--folds", "0") == 0
    cases = json.loads((out / "predictions.json").read_text())["cases"]
    name = first.replace("_0000.nii.gz", "")
    assert (
        cases[name]["status"] == "done"
        and cases[second.replace("_0000.nii.gz", "")]["status"] == "skipped"
    )
    assert nib.load(out / f"{name}.nii.gz").shape == cropped.shape


def test_ground_truth_of_the_same_names_is_never_overwritten(run_dir, small_demo, tmp_path):
    """-o a folder of labels named as the scans (labelsTr beside imagesTr): the first label of
    no run's record is named and nothing is written over it."""
    raw = tmp_path / "raw"
    shutil.copytree(Path(small_demo) / "raw", raw)
    before = {p.name: p.read_bytes() for p in (raw / "labelsTr").iterdir()}
    with pytest.raises(
        InputError, match=r"labelsTr: demo_000.nii.gz is there and no run's record lists it"
    ):
        run("-i", raw / "imagesTr", "-o", raw / "labelsTr", "--model", run_dir)
    assert {
        p.name: p.read_bytes() for p in (raw / "labelsTr").iterdir() if p.suffix == ".gz"
    } == before


def test_a_bug_stops_prediction_with_its_traceback(run_dir, scans, tmp_path, monkeypatch):
    """A bad scan is a FAILED line and the others go on; a bug in the code (here a KeyError in the
    mapping back to the scan's grid) is not a FAILED line for every scan: it stops the run."""

    def broken(*args, **kwargs):
        return {}["a key the code forgot"]

    monkeypatch.setattr(predict, "to_original_grid", broken)
    with pytest.raises(KeyError, match="a key the code forgot"):
        run("-i", scans, "-o", tmp_path / "out", "--model", run_dir, "--no-tta", "--folds", "0")


def test_a_model_with_non_finite_weights_is_refused(small_demo, scans, tmp_path):
    """A diverged model (NaN weights, as an older fine-tuning could save) predicts nothing."""
    models = make_run(tmp_path / "models", small_demo, folds=(0,))
    ckpt = torch.load(models / "model_fold0.pt", weights_only=True)
    ckpt["state_dict"]["head.refine.5.weight"].fill_(float("nan"))
    torch.save(ckpt, models / "model_fold0.pt")
    with pytest.raises(
        InputError,
        match=r"model_fold0.pt: 1 tensor\(s\) are not finite \(e.g. head.refine.5.weight\)",
    ):
        run("-i", scans, "-o", tmp_path / "out", "--model", models)
    assert not list((tmp_path / "out").glob("*.nii.gz"))
