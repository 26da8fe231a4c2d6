"""runtime.py, the boundary every script shares: checked flag types (and that every numeric flag of
every stage has one), the one preset step and its rules, the run folder as one unit, the wrapper
that reports a refusal in one line, the measured bf16 guard and the memory bound."""
import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime

ROOT = Path(__file__).resolve().parents[1]

# Every stage with flags, and the least it needs to parse.
SCRIPTS = {"pretrain": ["--data", "d"], "finetune": ["--data", "d", "--out", "o", "--init", "random"],
           "linear_probe": ["--data", "d", "--out", "o", "--init", "random"],
           "predict": ["-i", "in", "-o", "out", "--model", "m"], "preprocess": ["--demo", "d"]}
# Each checked type: values it takes, values it refuses and the words of its message.
TYPES = {runtime.positive_int: (["1", "7", "1000000000"], ["0", "-1", "1.5", "abc", "", "1000000001"], ">= 1 and <= 1e9"),
         runtime.non_negative_int: (["0", "3"], ["-1", "2.5", "x", "10000000000000000000000"], ">= 0 and <= 1e9"),
         runtime.positive_float: (["1e-3", "2"], ["0", "-1", "nan", "inf", "x"], "> 0"),
         runtime.non_negative_float: (["0", "0.5"], ["-1", "nan", "-inf", "x"], ">= 0"),
         runtime.open_fraction: (["0.5", "0.01"], ["0", "1", "1.5", "-0.2", "nan"], "in (0, 1)"),
         runtime.unit_interval: (["0", "1", "0.3"], ["-0.1", "1.01", "nan"], "in [0, 1]"),
         runtime.below_one: (["0", "0.999"], ["1", "-0.1", "2", "nan"], "in [0, 1)"),
         runtime.axis: (["0", "2"], ["3", "-1", "x"], "0, 1 or 2"),
         runtime.worker_count: (["0", "1", "8"], ["-1", str(runtime.MAX_WORKERS + 1), "100000"], "between 0 and")}


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


def check_numeric_flags(module, argv):
    """A flag that takes a number is parsed by a checked type (not int / float, not a string)."""
    for action in parser_of(module, argv)._actions:
        if not action.option_strings or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction,
                                                            argparse.BooleanOptionalAction)):
            continue
        defaults = action.default if isinstance(action.default, (list, tuple)) else [action.default]
        numeric = any(isinstance(d, (int, float)) and not isinstance(d, bool) for d in defaults)
        if action.type is not None or numeric:
            assert action.type in runtime.CHECKED_TYPES, f"{module.__name__} {action.option_strings[-1]}: {action.type}"


# ----------------------------------------------------------------------------- flags

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
        assert (rule in err[-1]) or "not a" in err[-1] or "finite" in err[-1], err[-1]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_numeric_flag_is_declared_with_a_checked_type(name):
    check_numeric_flags(importlib.import_module(name), SCRIPTS[name])


def test_a_bad_value_exits_2_before_any_file_is_written(tmp_path, monkeypatch, capsys):
    """One bad value per script, where it is parsed: exit 2, argparse's line, nothing written."""
    monkeypatch.chdir(tmp_path)
    for name, required in SCRIPTS.items():
        parser = parser_of(importlib.import_module(name), required)
        action = next(a for a in parser._actions if a.type in runtime.CHECKED_TYPES)
        values = [TYPES[action.type][1][0]] + ["1"] * ((action.nargs if isinstance(action.nargs, int) else 1) - 1)
        with pytest.raises(SystemExit) as e:
            importlib.import_module(name).parse_args([*required, action.option_strings[-1], *values])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and f"argument {action.option_strings[-1]}" in err[-1], name
        assert not any("Traceback" in line for line in err) and not list(tmp_path.iterdir())


def test_parse_presets_given_flags_and_rules(capsys):
    """The one preset step: paper defaults, a preset on top, the flags given on top of both; the
    flags given are named (a default equal to a given value still counts as given); a rule a run
    cannot honour exits 2 with its message."""
    def parser():
        p = argparse.ArgumentParser(prog="script")
        p.add_argument("--data")
        p.add_argument("--preset", choices=["paper", "demo"])
        p.add_argument("--steps", type=runtime.positive_int, default=100)
        p.add_argument("--lr", type=runtime.positive_float, default=1.0)
        p.add_argument("--axes", type=runtime.axis, nargs="*", default=(0, 1, 2))
        return p
    demo = lambda a: dict(steps=7, lr=0.5) if runtime.is_demo(a) else {}
    rules = [lambda a: a.steps < 5 and f"--steps {a.steps} is too few"]
    args = runtime.parse(parser(), ["--data", "x"], demo, rules)
    assert (args.steps, args.lr, args.given) == (100, 1.0, ["data"])
    args = runtime.parse(parser(), ["--data", "demo", "--lr", "1.0", "--axes"], demo, rules)
    assert (args.steps, args.lr, args.axes, args.given) == (7, 1.0, [], ["axes", "data", "lr"])
    assert runtime.parse(parser(), ["--data", "x", "--preset", "demo"], demo).steps == 7
    with pytest.raises(SystemExit) as e:
        runtime.parse(parser(), ["--data", "x", "--steps", "3"], demo, rules)
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith("script: error: --steps 3 is too few")


# ----------------------------------------------------------------------------- the run folder

def test_claim_run_is_one_unit(tmp_path):
    """A finished run is refused (naming its files) unless continued (same settings) or replaced;
    --force removes every file the earlier run wrote and only those; a continued run keeps them
    and records its own; other settings are named; a killed run's temp files go."""
    folder = tmp_path / "run"
    runtime.claim_run(folder, "test", ("results.json",), settings=dict(lr=1))
    for name in ("results.json", "model_fold0.pt", "model_fold1.pt"):
        runtime.atomic_write(folder / name, lambda tmp: tmp.write_text("x"))
    runtime.finish_run(folder)
    record = json.loads((folder / runtime.RECORD).read_text())
    assert record["finished"] and sorted(record["files"]) == ["model_fold0.pt", "model_fold1.pt", "results.json"]
    assert not (folder / ".lock").exists()
    (folder / "notes.txt").write_text("the user's own")
    (folder / ".tmp-99-results.json").write_text("half")
    with pytest.raises(ValueError, match=r"holds a finished run \(model_fold0.pt, model_fold1.pt, results.json\).*--force"):
        runtime.claim_run(folder, "test", ("results.json",), settings=dict(lr=1))
    runtime._unlock(folder)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(--lr 1 -> 2\)"):
        runtime.claim_run(folder, "test", ("results.json",), settings=dict(lr=2), resume=True)
    runtime._unlock(folder)
    runtime.claim_run(folder, "test", ("results.json",), settings=dict(lr=1), resume=True)
    assert set(runtime.run_files(folder)) == {"results.json", "model_fold0.pt", "model_fold1.pt"}
    assert not (folder / ".tmp-99-results.json").exists()
    runtime.finish_run(folder)
    runtime.claim_run(folder, "test", ("results.json",), settings=dict(lr=2), force=True)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", runtime.RECORD, "notes.txt"]
    assert runtime.run_files(folder) == []
    runtime.finish_run(folder)


def test_a_run_of_another_script_or_with_files_gone_is_named(tmp_path):
    """Another script's run is refused even with --force (the folder may be its data); a finished
    run one of whose files is gone is called unfinished (its --resume redoes what is missing)."""
    runtime.claim_run(tmp_path, "preprocess.py", ("dataset.json",))
    for name in ("dataset.json", "results.json"):
        runtime.atomic_write(tmp_path / name, lambda tmp: tmp.write_text("{}"))
    runtime.finish_run(tmp_path)
    with pytest.raises(ValueError, match=r"holds a run of preprocess.py \(dataset.json, results.json\): choose another"):
        runtime.claim_run(tmp_path, "pretrain.py", ("checkpoint.pt",), force=True)
    runtime._unlock(tmp_path)
    assert (tmp_path / "dataset.json").exists()
    (tmp_path / "results.json").unlink()
    with pytest.raises(ValueError, match=r"holds an unfinished run \(dataset.json\)"):
        runtime.claim_run(tmp_path, "preprocess.py", ("dataset.json",))
    runtime._unlock(tmp_path)


def test_an_unrecorded_output_counts_as_an_earlier_run(tmp_path):
    """A folder written before run records existed: its outputs are still never replaced silently."""
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds an unfinished run \(results.json\)"):
        runtime.claim_run(tmp_path, "test", ("results.json",))
    runtime._unlock(tmp_path)
    with pytest.raises(ValueError, match="other settings \\(none recorded\\)"):
        runtime.claim_run(tmp_path, "test", ("results.json",), settings={}, resume=True)
    runtime._unlock(tmp_path)


@pytest.mark.parametrize("problem", ["file", "unwritable"])
def test_an_output_folder_that_cannot_be_one_is_named(tmp_path, problem, monkeypatch):
    target = tmp_path / "out"
    if problem == "file":
        target.write_text("mine")
        words = "exists and is not a folder"
    else:
        target.mkdir()
        monkeypatch.setattr(runtime.os, "access", lambda p, mode: False)
        words = "folder is not writable"
    with pytest.raises(ValueError, match=f"--out {target}: {words}"):
        runtime.claim_run(target, "test")


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import runtime
def main(args):
    runtime.claim_run({folder!r}, "demo-script")
    if args == "value": raise ValueError("--x 3: no good")
    if args == "worker": raise ValueError("Caught ValueError in DataLoader worker process 0.\\nOriginal Traceback:\\n  ...\\nValueError: case a: truncated")
    if args == "nan": raise FloatingPointError("non-finite loss")
    if args == "ctrl-c": raise KeyboardInterrupt
    runtime.finish_run({folder!r})
    return 1
runtime.cli(main, lambda: sys.argv[1], interrupted="interrupted; kept")
"""


@pytest.mark.parametrize("case, code, last", [("value", 2, "error: --x 3: no good"), ("worker", 2, "error: case a: truncated"),
                                              ("nan", 1, "error: non-finite loss"), ("ctrl-c", 1, "interrupted; kept"),
                                              ("fine", 1, None)])
def test_cli_reports_one_line_and_frees_the_folder(tmp_path, case, code, last):
    """The one wrapper: a refusal (ValueError, even one a DataLoader worker wrapped in its
    traceback) is one line and exit 2, a non-finite stop and Ctrl-C one line and exit 1, main's
    return value the exit code; in every case the folder's lock is released."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(root=str(ROOT), folder=str(tmp_path / "out")))
    r = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True)
    assert r.returncode == code
    if last:
        assert r.stderr.strip().splitlines() == [f"script.py: {last}"]
    assert not (tmp_path / "out" / ".lock").exists()


def test_a_lock_of_a_running_process_refuses_and_a_dead_ones_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(str(os.getppid()))                     # a process that runs
    with pytest.raises(ValueError, match=f"is in use by another run \\(pid {os.getppid()}"):
        runtime.claim_run(folder, "test")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / ".lock").write_text(dead.stdout.strip())                   # a pid that no longer runs
    runtime.claim_run(folder, "test")
    assert "stale lock of pid" in capsys.readouterr().err and (folder / ".lock").read_text() == str(os.getpid())
    runtime.finish_run(folder)


# ----------------------------------------------------------------------------- device, precision, memory

@pytest.mark.skipif(runtime.autocast_dtype(torch.device("cpu")) is None,
                    reason="this CPU has no bf16 instructions: --amp trains in fp32")
def test_the_bf16_guard_lets_no_wrong_gradient_through():
    """On whatever CPU runs it: for first spatial sizes 1..12 (and two other Y x Z), measure the
    bf16 3x3x3 convolution's weight gradient against fp32; wherever it is wrong, the training
    guard falls back to fp32, and wherever the guard keeps bf16 the gradient is right."""
    torch.manual_seed(1)
    cpu = torch.device("cpu")
    for yz in ((5, 3), (16, 16)):
        for size in range(1, 13):
            conv = torch.nn.Conv3d(16, 16, 3, padding=1)
            x = torch.randn(2, 16, size, *yz)
            grads = []
            for dtype in (torch.bfloat16, None):
                conv.zero_grad()
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    y = conv(x)
                y.float().square().sum().backward()
                grads.append(conv.weight.grad.clone())
            wrong = not bool(((grads[0] - grads[1]).norm() / grads[1].norm()) < 0.05)
            kept = runtime.training_dtype(cpu, True, [16], (size, *yz)) is not None
            assert not (wrong and kept), (size, yz)


def test_memory_bound_names_the_estimate_and_the_machine():
    runtime.check_memory(2 ** 20, torch.device("cpu"), "a small step")
    with pytest.raises(ValueError, match=r"a huge step needs at least 1048576.0 GiB, more than this machine's [\d.]+ GiB"):
        runtime.check_memory(2 ** 50, torch.device("cpu"), "a huge step")


def test_file_digest_changes_with_the_content(tmp_path):
    a = tmp_path / "a.pt"
    a.write_bytes(b"one")
    first = runtime.file_digest(a)
    a.write_bytes(b"two")
    assert runtime.file_digest(a) != first and len(first) == 16
