"""The third hostile pass: nothing overwritten, nothing silently ignored, messages that name the
real cause. Each test is a command line that the code before this pass got wrong (a finished
result replaced, a traceback, a flag without effect accepted, a misleading message)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import finetune
import linear_probe
import predict
import preprocess
import pretrain

ROOT = Path(__file__).resolve().parents[1]
FT = ["--steps", "2", "--batch-size", "1", "--patch-size", "16", "16", "8", "--workers", "0", "--warmup-steps", "0",
      "--bn-batches", "2", "--eval-patch-size", "64", "64", "32", "--folds", "2", "--fold", "0", "--preset", "demo"]
PROBE = ["--eval-patch-size", "64", "64", "32", "--folds", "2", "--fold", "0", "--preset", "demo", "--max-steps", "3"]
PRE = ["--base-channels", "4", "--num-levels", "3", "--patch-size", "16", "16", "8", "--batch-pairs", "2",
       "--num-voxels", "32", "--workers", "0", "--log-every", "1"]


def one_line_exit(call, *words):
    """call() exits with one line that holds every word; -> the line."""
    with pytest.raises(SystemExit) as e:
        call()
    line = str(e.value.code)
    assert "\n" not in line.strip() and "Traceback" not in line, line
    for w in words:
        assert w in line, (w, line)
    return line


def snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------- nothing overwritten

def test_finetune_onto_an_earlier_finetune_is_refused_unless_force(small_demo, tmp_path):
    out = tmp_path / "ft"
    run = lambda *extra: finetune.main(finetune.parse_args(["--data", str(small_demo), "--init", "random", "--out",
                                                            str(out), *FT, *extra]))
    run()
    before = snapshot(out)
    one_line_exit(lambda: run("--base-channels", "8"), "already holds a finished result", "model_fold0.pt",
                  "results.json", "--force")
    assert snapshot(out) == before
    run("--base-channels", "8", "--force")
    assert json.loads((out / "results.json").read_text())["args"]["base_channels"] == 8


def test_probe_onto_an_earlier_probe_is_refused(small_demo, tmp_path):
    out = tmp_path / "probe"
    run = lambda *extra: linear_probe.main(linear_probe.parse_args(["--data", str(small_demo), "--init", "random",
                                                                    "--out", str(out), *PROBE, *extra]))
    run()
    before = snapshot(out)
    one_line_exit(lambda: run("--seed", "3"), "already holds a finished result", "results.json")
    assert snapshot(out) == before


def test_predict_rerun_with_other_settings_is_refused(small_demo, tmp_path, capsys):
    from test_predict import make_run
    models = make_run(tmp_path / "models", small_demo, folds=(0, 1))
    scan = sorted((Path(small_demo) / "raw" / "imagesTr").iterdir())[0]
    out = tmp_path / "pred"
    run = lambda *extra: predict.main(predict.parse_args(["-i", str(scan), "-o", str(out), "--model", str(models),
                                                          "--no-tta", *extra]))
    assert run() == 0
    report = (out / "predictions.json").read_text()
    assert run() == 0 and json.loads((out / "predictions.json").read_text())["cases"]   # same settings: continues
    capsys.readouterr()
    assert run("--folds", "0") == 2
    err = capsys.readouterr().err
    assert "other settings (models" in err and "--force" in err
    assert json.loads((out / "predictions.json").read_text())["models"] == json.loads(report)["models"]
    assert run("--folds", "0", "--force") == 0


def test_evidence_out_onto_a_file_is_one_line(small_demo, small_unlabelled, tmp_path):
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "evidence.py"), "--data", str(small_demo),
                        "--unlabelled", str(small_unlabelled), "--out", str(taken), "--quick"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "exists and is not a folder" in r.stderr and "Traceback" not in r.stderr
    assert taken.read_text() == "mine"


# ----------------------------------------------------------------------------- nothing silently ignored

def test_an_empty_validation_list_is_refused_before_training(small_demo, tmp_path):
    split = json.loads((Path(small_demo) / "split.json").read_text())
    empty = tmp_path / "split.json"
    empty.write_text(json.dumps(dict(train=split["train"] + split["val"], val=[], test=split["test"])))
    for module, flags in ((finetune, FT), (linear_probe, PROBE)):
        out = tmp_path / module.__name__
        one_line_exit(lambda: module.main(module.parse_args(["--data", str(small_demo), "--init", "random", "--out",
                                                             str(out), *flags, "--split", str(empty),
                                                             "--evaluate-on", "val"])), "'val' list is empty")
        assert not (out / "results.json").exists() and not list(out.glob("model_fold*.pt"))


@pytest.mark.parametrize("flags, words", [
    (["--steps", "2", "--keep-steps", "5"], ["--keep-steps 5", "past the end", "<= 2"]),
    (["--steps", "3", "--warmup-steps", "3"], ["--warmup-steps 3", "never reach --lr", "fewer than 3"]),
])
def test_pretrain_refuses_what_the_run_cannot_honour(small_demo, tmp_path, flags, words):
    out = tmp_path / "run"
    one_line_exit(lambda: pretrain.main(pretrain.parse_args(["--data", str(small_demo), "--out", str(out), *PRE,
                                                             *flags])), *words)
    assert not (out / "log.jsonl").exists()


@pytest.mark.parametrize("init, flags, words", [
    ("random", ["--eval-every", "10"], ["--eval-every 10", "past the end", "at most 2"]),
    ("random", ["--warmup-steps", "5"], ["--warmup-steps 5", "never reach --lr"]),
    ("random", ["--frozen-bn", "train"], ["--frozen-bn", "no effect", "nothing is frozen"]),
    ("checkpoint", ["--frozen-bn", "train", "--freeze-steps", "0"], ["--frozen-bn", "no effect", "--freeze-steps 0"]),
    ("random", ["--mirror-axes", "1", "2", "--aug", "none"], ["--mirror-axes", "no effect", "--aug none"]),
])
def test_finetune_refuses_what_the_run_cannot_honour(small_demo, tmp_path, init, flags, words):
    backbone = tmp_path / "pre"
    if init == "checkpoint":
        pretrain.main(pretrain.parse_args(["--data", str(small_demo), "--out", str(backbone), *PRE, "--steps", "1"]))
    start = ["--init", "random"] if init == "random" else ["--checkpoint", str(backbone)]
    out = tmp_path / "ft"
    one_line_exit(lambda: finetune.main(finetune.parse_args(["--data", str(small_demo), *start, "--out", str(out),
                                                             *FT, *flags])), *words)
    assert not out.exists()


@pytest.mark.parametrize("script, flags, words", [
    ("mim", ["--mask-block", "16", "16", "8"], ["--mask-block 16 16 8", "masks 100%", "not the 75%"]),
    ("mim", ["--mask-block", "32", "32", "16"], ["--mask-block 32 32 16", "larger than the 16x16x8 patch",
                                                 "X 32 > 16", "Z 16 > 8"]),
    ("medcontext", ["--mc-mask-block", "64", "64", "16"], ["--mc-mask-block 64 64 16", "larger than the 16x16x8"]),
    ("medcontext", ["--mc-mask-shape", "column", "--mc-mask-block", "64", "4", "4"],
     ["--mc-mask-block 64 4 4", "larger than the 16x16x8 patch (X 64 > 16)"]),
])
def test_a_mask_block_larger_than_the_patch_is_refused(small_demo, tmp_path, script, flags, words):
    import importlib
    module = importlib.import_module(f"experiments.neighbours.{script}")
    base = ["--data", str(small_demo), "--out", str(tmp_path / "o")]
    base += [*PRE] if script == "mim" else ["--init", "random", *FT]
    one_line_exit(lambda: module.main(module.parse_args([*base, *flags])), *words)
    assert not (tmp_path / "o" / "log.jsonl").exists() and not (tmp_path / "o" / "results.json").exists()


def test_evidence_refuses_a_corpus_that_is_not_apart_or_a_set_too_small(small_demo, small_unlabelled, tmp_path):
    evidence = [sys.executable, str(ROOT / "experiments" / "evidence.py"), "--quick"]
    same = subprocess.run([*evidence, "--data", str(small_demo), "--unlabelled", str(small_demo), "--out",
                           str(tmp_path / "a")], capture_output=True, text=True)
    assert same.returncode != 0 and "is not kept apart from --data" in same.stderr
    copy = tmp_path / "copy"                                    # the labelled scans, preprocessed again elsewhere
    shutil.copytree(small_demo, copy, ignore=shutil.ignore_patterns("raw"))
    mixed = subprocess.run([*evidence, "--data", str(small_demo), "--unlabelled", str(copy), "--out", str(tmp_path / "b")],
                           capture_output=True, text=True)
    assert mixed.returncode != 0 and "of its scans are labelled cases" in mixed.stderr
    small = tmp_path / "small"
    shutil.copytree(small_demo, small, ignore=shutil.ignore_patterns("raw", "split.json"))
    info = json.loads((small / "dataset.json").read_text())
    for case in info["cases"][2:]:
        case["labelled"] = False
    (small / "dataset.json").write_text(json.dumps(info))
    tiny = subprocess.run([*evidence, "--data", str(small), "--unlabelled", str(small_unlabelled), "--out",
                           str(tmp_path / "c")], capture_output=True, text=True)
    assert tiny.returncode != 0 and "2 labelled case(s)" in tiny.stderr and "at least 3" in tiny.stderr
    for r in (same, mixed, tiny):
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "c" / "pretrain-ours").exists()


def test_demo_of_too_few_cases_or_onto_a_file_is_one_line(tmp_path, capsys):
    args = lambda **k: preprocess.parse_args(["--demo", str(k["demo"]), "--num-cases", str(k.get("n", 3)),
                                              "--unlabelled-cases", "0"])
    assert preprocess.main(args(demo=tmp_path / "d", n=1)) == 2
    assert "--num-cases 1" in capsys.readouterr().err and not (tmp_path / "d").exists()
    (tmp_path / "file").write_text("x")
    assert preprocess.main(args(demo=tmp_path / "file")) == 2
    err = capsys.readouterr().err
    assert "exists and is not a folder" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- messages that name the cause

@pytest.mark.parametrize("make, words", [
    ("nifti", ["a NIfTI image"]), ("empty", ["an empty file"]), ("text", ["a text file"]), ("folder", ["a folder"]),
])
def test_inspect_names_what_a_file_is(tmp_path, make, words, capsys):
    from experiments import convert
    path = tmp_path / {"nifti": "scan.nii.gz", "empty": "empty.pt", "text": "notes.txt", "folder": "somewhere"}[make]
    if make == "nifti":
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(path))
    elif make == "empty":
        path.write_bytes(b"")
    elif make == "text":
        path.write_text("lr = 3e-4\n")
    else:
        path.mkdir()
    line = one_line_exit(lambda: convert.main(convert.parse_args(["--inspect", str(path)])), str(path), *words)
    assert "weights_only=False" not in line and "KeyError" not in line and "EOFError" not in line


def test_predict_with_a_text_file_as_model_says_so(small_demo, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    scan = sorted((Path(small_demo) / "raw" / "imagesTr").iterdir())[0]
    assert predict.main(predict.parse_args(["-i", str(scan), "-o", str(tmp_path / "o"), "--model", str(notes)])) == 2
    err = capsys.readouterr().err
    assert "a text file" in err and "weights_only=False" not in err


def test_evaluate_saved_without_models_names_the_missing_file(small_demo, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    one_line_exit(lambda: finetune.main(finetune.parse_args(["--data", str(small_demo), "--out", str(out), *FT,
                                                             "--evaluate-saved"])),
                  "--evaluate-saved", "model_fold0.pt")


@pytest.mark.parametrize("split, words", [
    (lambda s: dict(train=s["train"] + s["test"][:1], val=s["val"], test=s["test"]), ["is in both 'train' and 'test'"]),
    (lambda s: dict(train=s["train"] + ["demo_999"], val=s["val"], test=s["test"]), ["'demo_999' in 'train'", "not a labelled"]),
    (lambda s: dict(train=[], val=s["val"], test=s["test"] + s["train"]), ["the 'train' list is empty"]),
])
def test_split_errors_name_the_case_or_list(small_demo, tmp_path, split, words):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split(json.loads((Path(small_demo) / "split.json").read_text()))))
    one_line_exit(lambda: finetune.main(finetune.parse_args(["--data", str(small_demo), "--init", "random", "--out",
                                                             str(tmp_path / "o"), *FT, "--split", str(path)])), *words)


def test_crafted_model_file_is_refused_without_the_unsafe_hint(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    crafted = tmp_path / "model_fold0.pt"
    crafted.write_bytes(pickle.dumps({"kind": "segmenter", "x": Evil()}))
    with pytest.raises(ValueError) as e:
        predict.load_model(crafted)
    assert "code could run" in str(e.value) and "weights_only=False" not in str(e.value)
