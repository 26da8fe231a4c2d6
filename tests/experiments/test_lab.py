"""The lab's own scripts: flag types and one-line errors through the same mechanisms as the stages
(runtime.parse, runtime.cli), convert.py's inspect / export, bench.py's FLOP count against torch's
counter, and finetune_curve.py's measurements leaving the run unchanged."""

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import finetune
import pretrain
import runtime
import weights
from model import PretrainModel
from data import InputError

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "experiments.bench": [],
    "experiments.pretrain_curve": ["--data", "d", "--keep-steps", "0"],
    "experiments.convert": ["--inspect", "x"],
    "experiments.evidence": [],
    "experiments.diagnostics": ["--geometry"],
    "experiments.pretrain_grid": [],
    "experiments.compare": ["a"],
    "experiments.finetune_curve": [
        "--data",
        "d",
        "--out",
        "o",
        "--init",
        "random",
        "--eval-every",
        "1",
    ],
    "experiments.neighbours.genesis": ["--data", "d"],
    "experiments.neighbours.mim": ["--data", "d"],
    "experiments.neighbours.densecl": ["--data", "d"],
    "experiments.hostile": ["--work", "w"],
    "experiments.neighbours.medcontext": ["--data", "d", "--out", "o", "--init", "random"],
}
TINY = [
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
    "32",
    "--workers",
    "0",
    "--log-every",
    "1",
]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_numeric_flag_of_the_lab_is_checked(name):
    real, seen = argparse.ArgumentParser.parse_args, {}

    class Captured(Exception):
        pass

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        raise Captured

    argparse.ArgumentParser.parse_args = capture
    try:
        importlib.import_module(name).parse_args(SCRIPTS[name])
    except Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_args = real
    for action in seen["parser"]._actions:
        defaults = action.default if isinstance(action.default, (list, tuple)) else [action.default]
        numeric = any(isinstance(d, (int, float)) and not isinstance(d, bool) for d in defaults)
        if (
            action.option_strings
            and not isinstance(action.default, bool)
            and (action.type is not None or numeric)
        ):
            assert action.type in runtime.CHECKED_TYPES, (name, action.option_strings)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["experiments/compare.py", "missing"], "missing: not a results.json"),
        (["experiments/compare.py", "README.md"], "README.md: not a results.json"),
        (["experiments/diagnostics.py"], "give --backbone, --geometry or --demo-classes"),
        (
            ["experiments/diagnostics.py", "--backbone", "nowhere.pt", "--data", "nowhere"],
            "nowhere: no such data folder",
        ),
        (
            ["experiments/diagnostics.py", "--demo-classes", "nowhere"],
            "nowhere: no such data folder",
        ),
        (
            ["experiments/convert.py", "--inspect", "nowhere.pt"],
            "checkpoint nowhere.pt does not exist",
        ),
        (
            ["experiments/convert.py", "--inspect", "README.md"],
            "README.md could not be read safely: it is a text file",
        ),
        (["experiments/bench.py", "--steps", "0"], "argument --steps: must be >= 1"),
    ],
)
def test_a_wrong_input_to_the_lab_is_one_line(argv, words, tmp_path):
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and words in lines[-1], r.stderr[-500:]
    assert lines[-1].startswith(f"{Path(argv[0]).name}: error: ")


def test_export_reference_never_writes_over_its_input(small_demo, tmp_path, capsys):
    from experiments import convert

    out = tmp_path / "run"
    pretrain.main(
        pretrain.parse_args(["--data", str(small_demo), "--out", str(out), *TINY, "--steps", "1"])
    )
    capsys.readouterr()
    convert.main(convert.parse_args(["--inspect", str(out / "backbone.pt")]))
    printed = capsys.readouterr().out
    assert (
        "backbone.pt (pretrain.py)" in printed
        and "FPN3d(1, 4, 3)" in printed
        and "step 1" in printed
    )
    before = (out / "backbone.pt").read_bytes()
    with pytest.raises(InputError, match="exists; choose another file name"):
        convert.main(
            convert.parse_args(
                ["--export-reference", str(out / "backbone.pt"), str(out / "backbone.pt")]
            )
        )
    (tmp_path / "taken.pt").write_bytes(b"mine")
    with pytest.raises(
        InputError, match="exists; choose another file name \\(nothing is overwritten\\)"
    ):
        convert.main(
            convert.parse_args(
                ["--export-reference", str(out / "backbone.pt"), str(tmp_path / "taken.pt")]
            )
        )
    assert (out / "backbone.pt").read_bytes() == before and (
        tmp_path / "taken.pt"
    ).read_bytes() == b"mine"
    ckpt = torch.load(
        out / "backbone.pt", weights_only=True
    )  # tensors that do not fit their own configuration
    ckpt["state_dict"]["stem.weight"] = torch.zeros(1, 1, 1, 1, 1)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="do not fit FPN3d"):
        convert.main(
            convert.parse_args(
                ["--export-reference", str(tmp_path / "bad.pt"), str(tmp_path / "x.pt")]
            )
        )
    assert not (tmp_path / "x.pt").exists()
    r = subprocess.run(
        [
            sys.executable,
            "experiments/convert.py",
            "--export-reference",
            str(out / "backbone.pt"),
            str(tmp_path / "theirs.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    config = dict(in_channels=1, base_channels=4, num_levels=3)
    assert set(theirs) == set(weights.key_map(config).values())
    ours = torch.load(out / "backbone.pt", weights_only=True)["state_dict"]
    assert torch.equal(theirs["first_conv.weight"], ours["stem.weight"])


@pytest.mark.parametrize("recon_head", [False, True])
@pytest.mark.parametrize("patch", [(16, 16, 8), (17, 16, 7)])
def test_count_flops_matches_flop_counter(recon_head, patch):
    from experiments.bench import count_flops

    config = dict(in_channels=1, base_channels=4, num_levels=3)
    model = PretrainModel(config, arch="balanced")
    x = torch.randn(1, 1, *patch)
    with FlopCounterMode(display=False) as counter:
        pyramid = model.backbone(x)
        if recon_head:
            model.reconstruction_head(pyramid[0])
    assert count_flops(config, patch, recon_head=recon_head) == pytest.approx(
        counter.get_total_flops(), rel=1e-9
    )


def test_finetune_curve_records_without_changing_the_run(small_demo, tmp_path):
    """experiments/finetune_curve.py --eval-every 2: curve.json holds the test Dice at steps 2 and 4
    (on a copy with re-estimated BatchNorm) and how far each backbone level moved; the trained model
    is the one finetune.py gives without it, and the last point is the final model's Dice."""
    from experiments import finetune_curve

    base = [
        "--data",
        str(small_demo),
        "--init",
        "random",
        "--steps",
        "4",
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
        "--folds",
        "2",
        "--fold",
        "0",
        "--preset",
        "demo",
    ]
    plain = finetune.main(finetune.parse_args([*base, "--out", str(tmp_path / "plain")]))
    curved = finetune_curve.main(
        finetune_curve.parse_args([*base, "--out", str(tmp_path / "curve"), "--eval-every", "2"])
    )
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert [s for s, _ in curve["curve"]["0"]] == [2, 4] and all(
        0 <= d <= 1 for _, d in curve["curve"]["0"]
    )
    assert curved["folds"] == plain["folds"] and set(curve["weight_change"]["0"]) == {
        "0",
        "1",
        "2",
        "3",
    }
    a = torch.load(tmp_path / "plain" / "model_fold0.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "curve" / "model_fold0.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert curve["curve"]["0"][-1][1] == pytest.approx(
        curved["folds"]["0"]
    )  # the last point is the final model
    with pytest.raises(SystemExit):
        finetune_curve.parse_args(
            [*base, "--out", str(tmp_path / "x"), "--eval-every", "10"]
        )  # past the end


def test_weight_change_per_level():
    from experiments.finetune_curve import weight_change
    from model import SegmentationModel

    torch.manual_seed(0)
    model = SegmentationModel(
        dict(in_channels=1, base_channels=4, num_levels=3), 3, head="nonlinear"
    )
    initial = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert all(v == 0 for v in weight_change(model, initial).values())
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if name.startswith(("encoder.2.", "decoder.2.", "lateral.2.", "skip.2.", "down.2.")):
                p.mul_(2.0)  # level 2 moves by exactly ||w0||
    change = weight_change(model, initial)
    assert change["2"] == pytest.approx(1.0) and change["0"] == 0 and change["1"] == 0


def test_kept_steps_are_backbones_along_the_run(small_demo, tmp_path):
    """experiments/pretrain_curve.py --keep-steps 0 1 3: the initialisation and the backbone after
    steps 1 and 3, each loadable
    like backbone.pt; the last equals backbone.pt, the first the untrained FPN."""
    from experiments import pretrain_curve

    pretrain_curve.main(
        pretrain_curve.parse_args(
            [
                "--data",
                str(small_demo),
                "--out",
                str(tmp_path),
                *TINY,
                "--steps",
                "3",
                "--keep-steps",
                "0",
                "1",
                "3",
            ]
        )
    )
    kept = {s: torch.load(tmp_path / f"backbone_step{s}.pt", weights_only=True) for s in (0, 1, 3)}
    final = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert [kept[s]["step"] for s in (0, 1, 3)] == [0, 1, 3]
    torch.manual_seed(0)
    fresh = pretrain.build_model(kept[0]["pretrain_config"])
    for k, v in fresh.backbone.state_dict().items():
        assert torch.equal(kept[0]["state_dict"][k], v), k
        assert torch.equal(kept[3]["state_dict"][k], final["state_dict"][k]), k
    assert any(
        not torch.equal(kept[0]["state_dict"][k], kept[1]["state_dict"][k])
        for k in final["state_dict"]
    )
    assert not (tmp_path / "backbone_step2.pt").exists()
