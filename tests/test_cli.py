"""Command lines, checked where they are parsed. (1) Every flag type of runtime.py: good values
pass, bad ones exit 2 with argparse's one line naming the flag and the rule; and every numeric
flag of every script (the stages, predict.py, the lab's) is declared with one of those types.
(2) Hostile and mistaken command lines of the earlier passes, each of which the code before it
got wrong."""
import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runtime

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Every script with flags, and the least it needs to parse.
SCRIPTS = {"pretrain": ["--data", "d"], "finetune": ["--data", "d", "--out", "o", "--init", "random"],
           "linear_probe": ["--data", "d", "--out", "o", "--init", "random"],
           "predict": ["-i", "in", "-o", "out", "--model", "m"], "preprocess": [],
           "experiments.bench": [], "experiments.convert": ["--inspect", "x"], "experiments.evidence": [],
           "experiments.diagnostics": ["--geometry"], "experiments.pretrain_grid": [],
           "experiments.compare": ["a"],
           "experiments.neighbours.genesis": ["--data", "d"], "experiments.neighbours.mim": ["--data", "d"],
           "experiments.neighbours.densecl": ["--data", "d"],
           "experiments.neighbours.medcontext": ["--data", "d", "--out", "o", "--init", "random"]}
# Each checked type: values it takes, values it refuses and the words of its message.
TYPES = {runtime.positive_int: (["1", "7"], ["0", "-1", "1.5", "abc", ""], ">= 1"),
         runtime.non_negative_int: (["0", "3"], ["-1", "2.5", "x"], ">= 0"),
         runtime.positive_float: (["1e-3", "2"], ["0", "-1", "nan", "inf", "x"], "> 0"),
         runtime.non_negative_float: (["0", "0.5"], ["-1", "nan", "-inf", "x"], ">= 0"),
         runtime.open_fraction: (["0.5", "0.01"], ["0", "1", "1.5", "-0.2", "nan"], "in (0, 1)"),
         runtime.unit_interval: (["0", "1", "0.3"], ["-0.1", "1.01", "nan"], "in [0, 1]"),
         runtime.momentum: (["0", "0.999"], ["1", "-0.1", "2", "nan"], "in [0, 1)"),
         runtime.axis: (["0", "2"], ["3", "-1", "x"], "0, 1 or 2")}


class _Captured(Exception):
    pass


def parser_of(module, argv):
    """The ArgumentParser a script's parse_args builds (caught at its first parse_args call)."""
    real, seen = argparse.ArgumentParser.parse_args, {}

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        raise _Captured

    argparse.ArgumentParser.parse_args = capture
    try:
        module.parse_args(argv)
    except _Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_args = real
    return seen["parser"]


def test_the_types_cover_every_checked_type():
    assert set(TYPES) == set(runtime.CHECKED_TYPES)


@pytest.mark.parametrize("kind", list(TYPES), ids=lambda k: k.__name__)
def test_each_flag_type_takes_good_values_and_names_bad_ones(kind, capsys):
    good, bad, rule = TYPES[kind]
    p = argparse.ArgumentParser(prog="script")
    p.add_argument("--value", type=kind)
    for text in good:
        assert p.parse_args([f"--value={text}"]).value == pytest.approx(float(text))
    for text in bad:
        with pytest.raises(SystemExit) as e:
            p.parse_args([f"--value={text}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("script: error: argument --value: ")
        assert (rule in err[-1]) or "not a" in err[-1] or "finite" in err[-1]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_numeric_flag_is_declared_with_a_checked_type(name):
    """A flag that takes a number is parsed by a checked type (not int / float, not a string):
    the type is one of runtime.CHECKED_TYPES whenever there is a type, and a flag whose default
    is a number has one."""
    parser = parser_of(importlib.import_module(name), SCRIPTS[name])
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction,
                                                            argparse.BooleanOptionalAction)):
            continue
        defaults = action.default if isinstance(action.default, (list, tuple)) else [action.default]
        numeric = any(isinstance(d, (int, float)) and not isinstance(d, bool) for d in defaults)
        flag = action.option_strings[-1]
        if action.type is not None or numeric:
            assert action.type in runtime.CHECKED_TYPES, f"{name} {flag}: type {action.type}"


def test_a_bad_value_exits_2_before_any_file_is_written(tmp_path, monkeypatch, capsys):
    """One bad value per script, where it is parsed: exit 2, argparse's line, nothing written."""
    monkeypatch.chdir(tmp_path)
    for name, required in SCRIPTS.items():
        parser = parser_of(importlib.import_module(name), required)
        action = next((a for a in parser._actions if a.type in runtime.CHECKED_TYPES), None)
        if action is None:
            continue
        values = [TYPES[action.type][1][0]] + ["1"] * ((action.nargs if isinstance(action.nargs, int) else 1) - 1)
        with pytest.raises(SystemExit) as e:
            importlib.import_module(name).parse_args([*required, action.option_strings[-1], *values])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and f"argument {action.option_strings[-1]}" in err[-1], name
        assert not any("Traceback" in line for line in err) and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- the six cases

def test_negative_grad_clip_is_refused(capsys):
    import pretrain
    with pytest.raises(SystemExit) as e:
        pretrain.parse_args(["--data", "demo", "--steps", "3", "--grad-clip", "-1"])
    assert e.value.code == 2 and "argument --grad-clip: must be > 0" in capsys.readouterr().err


def test_negative_finetune_steps_are_refused(capsys):
    import finetune
    with pytest.raises(SystemExit) as e:
        finetune.parse_args(["--data", "demo", "--init", "random", "--out", "o", "--steps", "-1"])
    assert e.value.code == 2 and "argument --steps: must be >= 1" in capsys.readouterr().err


TINY = ["--base-channels", "4", "--num-levels", "3", "--patch-size", "16", "16", "8", "--batch-pairs", "2",
        "--num-voxels", "32", "--workers", "0", "--log-every", "1"]


def test_two_runs_into_one_folder_and_ctrl_c(small_demo, tmp_path):
    """Two pretrain.py processes into one --out: the second is refused with one line while the
    first runs, and the first's log holds its own rows only, in order. Ctrl-C then ends the first
    with one line naming its last checkpoint, and the folder is free again."""
    import signal
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--data", str(small_demo), "--out", str(out), *TINY,
           "--checkpoint-every", "2"]
    first = subprocess.Popen([*cmd, "--steps", "100000", "--seed", "1"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run([*cmd, "--steps", "40", "--seed", "2"], env=env, capture_output=True, text=True,
                            timeout=120)
    first.send_signal(signal.SIGINT)
    _, first_err = first.communicate(timeout=120)
    assert second.returncode == 1
    assert "is in use by another run (pid" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 1 and "Traceback" not in first_err
    assert f"interrupted; the last checkpoint is {out / 'checkpoint.pt'}" in first_err.strip().splitlines()[-1]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and rows
    assert not (out / ".lock").exists()                              # released


def test_stale_lock_of_a_killed_run_is_taken_over(small_demo, tmp_path, capsys):
    import pretrain
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(dead.stdout.strip())                  # a pid that no longer runs
    pretrain.main(pretrain.parse_args(["--data", str(small_demo), "--out", str(out), *TINY, "--steps", "1"]))
    assert "stale lock of pid" in capsys.readouterr().err
    assert (out / "backbone.pt").exists() and not (out / ".lock").exists()


@pytest.mark.parametrize("flag, value", [("--seed", "5"), ("--data", "other")])
def test_resume_refuses_a_changed_seed_or_data(small_demo, tmp_path, flag, value):
    import shutil
    import pretrain
    out = tmp_path / "run"
    pretrain.main(pretrain.parse_args(["--data", str(small_demo), "--out", str(out), *TINY, "--steps", "1"]))
    data = small_demo
    if flag == "--data":                                             # the same cases, in another folder
        data = tmp_path / "copy"
        shutil.copytree(small_demo, data, ignore=shutil.ignore_patterns("raw"))
    extra = [flag, value] if flag == "--seed" else []
    with pytest.raises(SystemExit, match="--resume with settings that differ") as e:
        pretrain.main(pretrain.parse_args(["--data", str(data), "--out", str(out), *TINY, "--steps", "2",
                                           "--resume", *extra]))
    assert ("--seed 0 -> 5" if flag == "--seed" else "--data ") in str(e.value.code)


def test_export_reference_never_writes_over_its_input(small_demo, tmp_path):
    from experiments import convert
    import pretrain
    out = tmp_path / "run"
    pretrain.main(pretrain.parse_args(["--data", str(small_demo), "--out", str(out), *TINY, "--steps", "1"]))
    before = (out / "backbone.pt").read_bytes()
    with pytest.raises(SystemExit, match="is the input itself"):
        convert.main(convert.parse_args(["--export-reference", str(out / "backbone.pt"), str(out / "backbone.pt")]))
    (tmp_path / "taken.pt").write_bytes(b"mine")
    with pytest.raises(SystemExit, match="exists; choose another file name or pass --force"):
        convert.main(convert.parse_args(["--export-reference", str(out / "backbone.pt"), str(tmp_path / "taken.pt")]))
    assert (out / "backbone.pt").read_bytes() == before and (tmp_path / "taken.pt").read_bytes() == b"mine"
    # a backbone.pt whose tensors do not fit its own configuration is refused, not exported
    ckpt = torch.load(out / "backbone.pt", weights_only=True)
    ckpt["state_dict"]["stem.weight"] = torch.zeros(1, 1, 1, 1, 1)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="do not fit FPN3d"):
        convert.main(convert.parse_args(["--export-reference", str(tmp_path / "bad.pt"), str(tmp_path / "x.pt")]))
    assert not (tmp_path / "x.pt").exists()


def test_inspect_reports_our_own_backbone(small_demo, tmp_path, capsys):
    from experiments import convert
    import pretrain
    out = tmp_path / "run"
    pretrain.main(pretrain.parse_args(["--data", str(small_demo), "--out", str(out), *TINY, "--steps", "1"]))
    capsys.readouterr()
    convert.main(convert.parse_args(["--inspect", str(out / "backbone.pt")]))
    printed = capsys.readouterr().out
    assert "backbone.pt (pretrain.py)" in printed and "FPN3d(1, 4, 3)" in printed and "step 1" in printed
    ckpt = torch.load(out / "backbone.pt", weights_only=True)
    del ckpt["state_dict"]["stem.bias"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(SystemExit, match="1 key\\(s\\) missing"):
        convert.main(convert.parse_args(["--inspect", str(tmp_path / "missing.pt")]))


def test_checkpoint_decides_the_backbone_in_every_script(small_demo, tmp_path):
    """--base-channels contradicting the backbone file gets the same answer from the probe,
    fine-tuning and pretraining's --init-from."""
    import finetune
    import linear_probe
    import pretrain
    out = tmp_path / "run"
    pretrain.main(pretrain.parse_args(["--data", str(small_demo), "--out", str(out), *TINY, "--steps", "1"]))
    backbone = str(out / "backbone.pt")
    for module in (linear_probe, finetune):
        with pytest.raises(SystemExit, match=f"--base-channels 8 contradicts {backbone} \\(4\\)"):
            module.main(module.parse_args(["--data", str(small_demo), "--checkpoint", backbone, "--out",
                                           str(tmp_path / module.__name__), "--base-channels", "8"]))
    with pytest.raises(SystemExit, match=f"--base-channels 8 contradicts {backbone} \\(4\\)"):
        pretrain.main(pretrain.parse_args(["--data", str(small_demo), "--out", str(tmp_path / "again"), *TINY,
                                           "--base-channels", "8", "--init-from", backbone]))


def test_more_voxels_than_a_patch_holds_is_refused(small_demo, tmp_path):
    import pretrain
    with pytest.raises(SystemExit, match="--num-voxels 5000 is more than a 16x16x8 patch holds"):
        pretrain.main(pretrain.parse_args(["--data", str(small_demo), "--out", str(tmp_path / "r"), *TINY,
                                           "--num-voxels", "5000"]))


# ----------------------------------------------------------------------------- inputs that are named

def test_complex_image_tiny_resample_and_dead_links_are_named(tmp_path, capsys):
    import numpy as np
    import preprocess
    from test_preprocess import AFFINE, save, tiny_scan
    rng = np.random.default_rng(0)
    image, label = tiny_scan(rng)
    with pytest.raises(preprocess.PreprocessError, match="complex-valued voxels"):
        preprocess.preprocess_arrays(image.astype(np.complex64), AFFINE, "ct")
    tiny = AFFINE.copy()
    tiny[:3, :3] /= 1000.0                                           # a header in metres, not mm
    with pytest.raises(preprocess.PreprocessError, match="almost nothing; is the voxel size in the header right"):
        preprocess.preprocess_arrays(image, tiny, "ct")
    raw = tmp_path / "raw"
    save(raw / "good.nii.gz", image, AFFINE)
    (raw / "loop.nii.gz").symlink_to(raw / "loop.nii.gz")            # a link to itself
    (raw / "gone.nii.gz").symlink_to(raw / "missing.nii.gz")
    assert [n for n, _ in preprocess.list_nifti(raw)] == ["good"]
    err = capsys.readouterr().err
    assert "loop.nii.gz: a symbolic link that leads nowhere" in err and "gone.nii.gz" in err
