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
from data import InputError

ROOT = Path(__file__).resolve().parents[1]

# Every stage with flags, and the least it needs to parse.
SCRIPTS = {
    "pretrain": ["--data", "d"],
    "finetune": ["--data", "d", "--out", "o", "--init", "random"],
    "linear_probe": ["--data", "d", "--out", "o", "--init", "random"],
    "predict": ["-i", "in", "-o", "out", "--model", "m"],
    "preprocess": ["--demo", "d"],
}
# Each checked type: values it takes, values it refuses and the words of its message.
TYPES = {
    runtime.positive_int: (
        ["1", "7", "1000000000"],
        ["0", "-1", "1.5", "abc", "", "1000000001"],
        ">= 1 and <= 1e9",
    ),
    runtime.non_negative_int: (
        ["0", "3"],
        ["-1", "2.5", "x", "10000000000000000000000"],
        ">= 0 and <= 1e9",
    ),
    runtime.positive_float: (["1e-3", "2"], ["0", "-1", "nan", "inf", "x"], "> 0"),
    runtime.non_negative_float: (["0", "0.5"], ["-1", "nan", "-inf", "x"], ">= 0"),
    runtime.open_fraction: (["0.5", "0.01"], ["0", "1", "1.5", "-0.2", "nan"], "in (0, 1)"),
    runtime.unit_interval: (["0", "1", "0.3"], ["-0.1", "1.01", "nan"], "in [0, 1]"),
    runtime.below_one: (["0", "0.999"], ["1", "-0.1", "2", "nan"], "in [0, 1)"),
    runtime.axis: (["0", "2"], ["3", "-1", "x"], "0, 1 or 2"),
    runtime.worker_count: (
        ["0", "1", "8"],
        ["-1", str(runtime.MAX_WORKERS + 1), "100000"],
        "between 0 and",
    ),
}


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
        if not action.option_strings or isinstance(
            action,
            (argparse._StoreTrueAction, argparse._HelpAction, argparse.BooleanOptionalAction),
        ):
            continue
        defaults = action.default if isinstance(action.default, (list, tuple)) else [action.default]
        numeric = any(isinstance(d, (int, float)) and not isinstance(d, bool) for d in defaults)
        if action.type is not None or numeric:
            assert action.type in runtime.CHECKED_TYPES, (
                f"{module.__name__} {action.option_strings[-1]}: {action.type}"
            )


# ----------------------------------------------------------------------------- flags


def test_the_types_cover_every_checked_type():
    assert set(TYPES) == set(runtime.CHECKED_TYPES)


@pytest.mark.parametrize("kind", list(TYPES), ids=lambda k: k.rule)
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
        values = [TYPES[action.type][1][0]] + ["1"] * (
            (action.nargs if isinstance(action.nargs, int) else 1) - 1
        )
        with pytest.raises(SystemExit) as e:
            importlib.import_module(name).parse_args(
                [*required, action.option_strings[-1], *values]
            )
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and f"argument {action.option_strings[-1]}" in err[-1], name
        assert not any("Traceback" in line for line in err) and not list(tmp_path.iterdir())


def test_parse_presets_given_flags_and_refusals(capsys):
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
    rules = lambda a: [a.steps < 5 and f"--steps {a.steps} is too few"]
    args = runtime.parse(parser(), ["--data", "x"], demo, rules)
    assert (args.steps, args.lr, args.given) == (100, 1.0, ["data"])
    args = runtime.parse(parser(), ["--data", "demo", "--lr", "1.0", "--axes"], demo, rules)
    assert (args.steps, args.lr, args.axes, args.given) == (7, 1.0, [], ["axes", "data", "lr"])
    assert runtime.parse(parser(), ["--data", "x", "--preset", "demo"], demo).steps == 7
    with pytest.raises(SystemExit) as e:
        runtime.parse(parser(), ["--data", "x", "--steps", "3"], demo, rules)
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(
        "script: error: --steps 3 is too few"
    )


# ----------------------------------------------------------------------------- the run folder


def write(folder, *names):
    for name in names:
        with runtime.atomic(folder / name) as tmp:
            tmp.write_text("x")


def test_claim_run_continues_replaces_or_refuses_by_the_record(tmp_path):
    """A finished run is refused (naming its files) unless continued (same settings and inputs) or
    replaced; --force removes every file the run's record lists and only those; other settings
    and other inputs are named; a killed run's temp files of recorded names go, a user's do not."""
    folder = tmp_path / "run"
    outputs = ["results.json", "model_fold0.pt", "model_fold1.pt"]
    assert runtime.claim_run(folder, "test", outputs, dict(lr=1), inputs={"case_a": [1, 2]}) == []
    write(folder, *outputs)
    runtime.finish_run(folder)
    record = json.loads((folder / runtime.RECORD).read_text())
    assert (
        record["finished"]
        and record["files"] == sorted(outputs)
        and not (folder / ".lock").exists()
    )
    write(folder, "notes.txt", "model_fold0_v1.pt", "backbone_best_keep.pt")  # the user's own files
    (folder / ".tmp.results.json").write_text("half")  # a killed write
    (folder / ".tmp-99-mine").write_text("the user's")
    with pytest.raises(
        InputError, match=r"holds a finished run \(model_fold0.pt, model_fold1.pt, results.json\)"
    ):
        runtime.claim_run(folder, "test", outputs, dict(lr=1))
    with pytest.raises(InputError, match=r"holds a run with other settings \(--lr 1 -> 2\)"):
        runtime.claim_run(folder, "test", outputs, dict(lr=2), resume=True)
    with pytest.raises(InputError, match=r"holds a run that read other inputs: case_a changed"):
        runtime.claim_run(
            folder, "test", outputs, dict(lr=1), inputs={"case_a": [1, 3]}, resume=True
        )
    kept = runtime.claim_run(
        folder, "test", outputs, dict(lr=1), inputs={"case_a": [1, 2]}, resume=True
    )
    assert sorted(kept) == sorted(outputs) and not (folder / ".tmp.results.json").exists()
    runtime.finish_run(folder)
    assert runtime.claim_run(folder, "test", outputs[:1], dict(lr=2), force=True) == []
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            ".lock",
            runtime.RECORD,
            ".tmp-99-mine",
            "backbone_best_keep.pt",
            "model_fold0_v1.pt",
            "notes.txt",
        ]
    )
    runtime.finish_run(folder)


def test_a_file_of_no_record_is_never_replaced(tmp_path):
    """A folder holding files no run wrote is not an earlier run: a run that writes other names
    goes ahead beside them; one that would overwrite such a file is refused, naming it, with or
    without --force, and the file keeps its bytes."""
    (tmp_path / "dataset.json").write_text("the raw dataset's own")
    (tmp_path / "demo_000.nii.gz").write_text("a ground-truth label")
    runtime.claim_run(tmp_path, "test", ["results.json"], {})
    runtime.finish_run(tmp_path)
    for force in (False, True):
        with pytest.raises(
            InputError, match=r"--out \S+: demo_000.nii.gz is there and no run's record lists it"
        ):
            runtime.claim_run(tmp_path, "other", ["demo_000.nii.gz"], {}, force=force)
    assert (tmp_path / "demo_000.nii.gz").read_text() == "a ground-truth label"
    assert (tmp_path / "dataset.json").read_text() == "the raw dataset's own"


def test_a_run_of_another_script_or_with_files_gone_is_named(tmp_path):
    """Another script's run is refused even with --force (the folder may be its data); a finished
    run one of whose files is gone is called unfinished (its --resume redoes what is missing)."""
    runtime.claim_run(tmp_path, "preprocess.py", ["dataset.json", "results.json"], {})
    write(tmp_path, "dataset.json", "results.json")
    runtime.finish_run(tmp_path)
    with pytest.raises(
        InputError,
        match=r"holds a run of preprocess.py \(dataset.json, results.json\): choose another",
    ):
        runtime.claim_run(tmp_path, "pretrain.py", ["checkpoint.pt"], {}, force=True)
    assert (tmp_path / "dataset.json").exists()
    (tmp_path / "results.json").unlink()
    with pytest.raises(InputError, match=r"holds an unfinished run \(dataset.json\)"):
        runtime.claim_run(tmp_path, "preprocess.py", ["dataset.json", "results.json"], {})


@pytest.mark.parametrize("problem", ["file", "unwritable"])
def test_an_output_folder_that_cannot_be_one_is_named(tmp_path, problem, monkeypatch):
    target = tmp_path / "out"
    if problem == "file":
        target.write_text("mine")
        words = "cannot be a folder"
    else:
        target.mkdir()
        monkeypatch.setattr(runtime.os, "access", lambda p, mode: False)
        words = "folder is not writable"
    with pytest.raises(InputError, match=f"--out {target}: {words}"):
        runtime.claim_run(target, "test", [], {})


def test_an_output_inside_its_input_is_refused(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "scan.nii.gz").write_text("x")
    for out, source in (
        (tmp_path / "raw", tmp_path / "raw"),
        (tmp_path / "raw" / "o", tmp_path / "raw"),
        (tmp_path / "raw" / "o", tmp_path / "raw" / "scan.nii.gz"),
    ):
        with pytest.raises(InputError, match="is \\(inside\\) -i"):
            runtime.refuse_inside(out, source, "-o", "-i")
    runtime.refuse_inside(tmp_path / "pred", tmp_path / "raw", "-o", "-i")


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import runtime
from data import InputError
def main(args):
    runtime.claim_run({folder!r}, "demo-script", [], {{}})
    if args == "input": raise InputError("--x 3: no good")
    if args == "nan": raise runtime.Diverged("non-finite loss")
    if args == "ctrl-c": raise KeyboardInterrupt
    if args == "value": int("three")                   # a bug: not the user's
    if args == "os": open("/nonexistent/file")         # a bug too
    if args == "key": {{}}["missing"]
    runtime.finish_run({folder!r})
    return 1
runtime.cli(main, lambda: sys.argv[1], interrupted="interrupted; kept")
"""


@pytest.mark.parametrize(
    "case, code, last",
    [
        ("input", 2, "error: --x 3: no good"),
        ("nan", 1, "error: non-finite loss"),
        ("ctrl-c", 1, "interrupted; kept"),
        ("fine", 1, None),
        ("value", 1, "ValueError"),
        ("os", 1, "FileNotFoundError"),
        ("key", 1, "KeyError"),
    ],
)
def test_cli_reports_bad_input_in_one_line_and_a_bug_with_its_traceback(tmp_path, case, code, last):
    """The one wrapper: an InputError is one line and exit 2, a diverged run and Ctrl-C one line
    and exit 1, main's return value the exit code; any other exception, ValueError and OSError
    included, is a bug and keeps its traceback naming the file and line; in every case the
    folder's lock is released."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(root=str(ROOT), folder=str(tmp_path / "out")))
    r = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True)
    assert r.returncode == code
    err = r.stderr.strip().splitlines()
    if case in ("value", "os", "key"):
        assert err[0] == "Traceback (most recent call last):" and err[-1].startswith(last)
        assert any(f'File "{script}", line' in line for line in err)
    elif last:
        assert err == [f"script.py: {last}"]
    assert not (tmp_path / "out" / ".lock").exists()


def test_a_lock_of_a_running_process_refuses_and_a_dead_ones_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(str(os.getppid()))  # a process that runs
    with pytest.raises(InputError, match=f"is in use by another run \\(pid {os.getppid()}"):
        runtime.claim_run(folder, "test", [], {})
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (folder / ".lock").write_text(dead.stdout.strip())  # a pid that no longer runs
    runtime.claim_run(folder, "test", [], {})
    assert "stale lock of pid" in capsys.readouterr().err and (folder / ".lock").read_text() == str(
        os.getpid()
    )
    runtime.finish_run(folder)


# ----------------------------------------------------------------------------- device, precision,
# memory


@pytest.mark.skipif(
    runtime.amp_dtype(torch.device("cpu")) is None,
    reason="this CPU has no bf16 instructions: --amp trains in fp32",
)
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
            kept = runtime.amp_dtype(cpu, True, [16], (size, *yz)) is not None
            assert not (wrong and kept), (size, yz)


def test_memory_bound_names_the_estimate_and_the_machine():
    runtime.check_memory(2**20, torch.device("cpu"), "a small step")
    with pytest.raises(
        InputError,
        match=r"a huge step needs at least 1048576.0 GiB, more than this machine's [\d.]+ GiB",
    ):
        runtime.check_memory(2**50, torch.device("cpu"), "a huge step")


def test_a_device_this_machine_lacks_is_named():
    assert (
        runtime.pick_device("auto").type in ("cpu", "cuda")
        and runtime.pick_device("cpu").type == "cpu"
    )
    for name in ("cuda:7", "tpu", "cpu:x"):
        with pytest.raises(
            InputError, match=f"--device {name}: not a device of this machine \\(cpu"
        ):
            runtime.pick_device(name)


def test_a_global_batch_splits_over_processes_or_is_named():
    assert runtime.split_batch(8, 2, 2, "--batch-pairs") == 4
    with pytest.raises(
        InputError, match="--batch-pairs 6 is the global batch: it must split evenly over 2 process"
    ):
        runtime.split_batch(6, 2, 2, "--batch-pairs")


def test_the_warm_up_every_loop_shares():
    assert [runtime.warmup(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert runtime.warmup(0, 0) == 1.0
