"""finetune.py: the schedule of Sec. 3.2 (freeze, exponential ramp, warm-up, BatchNorm while
frozen), precise BatchNorm, the paired arms' identical inputs, the rules a run cannot honour, the
run folder as one unit (--force removes the replaced run's folds, a killed run continues with
--resume and equals an uninterrupted one), and torchrun with gloo."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import downstream
import finetune
import supervised_augment
from model import SegmentationModel
from data import InputError

ROOT = Path(__file__).resolve().parents[1]
TINY = [
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
    "--warmup-steps",
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


# ----------------------------------------------------------------------------- the schedule


def test_backbone_lr_schedule():
    cfg = dict(freeze_steps=100, ramp_steps=10, ramp_start_lr=3e-5, lr=3e-4, backbone_lr_scale=1.0)
    assert finetune.backbone_lr(0, cfg) == 0 and finetune.backbone_lr(99, cfg) == 0
    assert finetune.backbone_lr(100, cfg) == pytest.approx(3e-5)
    assert finetune.backbone_lr(105, cfg) == pytest.approx(
        math.sqrt(3e-5 * 3e-4)
    )  # exponential ramp
    assert finetune.backbone_lr(110, cfg) == finetune.backbone_lr(10_000, cfg) == 3e-4


def test_backbone_lr_scale_and_warmup():
    cfg = dict(
        freeze_steps=0,
        ramp_steps=0,
        ramp_start_lr=3e-5,
        lr=3e-4,
        backbone_lr_scale=0.1,
        warmup_steps=4,
    )
    assert finetune.backbone_lr(0, cfg) == pytest.approx(3e-5) and finetune.backbone_lr(
        50, cfg
    ) == pytest.approx(3e-5)


@pytest.mark.parametrize("frozen_bn", ["eval", "train"])
def test_frozen_backbone_batchnorm_eval_or_train(frozen_bn):
    """While the backbone is frozen: with eval nothing of it changes; with train only its BatchNorm
    weights and statistics do (Lightning's train_bn), at the head's lr; the head trains in both."""
    torch.manual_seed(0)
    model = SegmentationModel(
        dict(in_channels=1, base_channels=4, num_levels=2), 3, head="nonlinear"
    ).train()
    cfg = dict(
        freeze_steps=10,
        ramp_steps=2,
        ramp_start_lr=1e-4,
        lr=1e-2,
        backbone_lr_scale=1.0,
        warmup_steps=0,
        frozen_bn=frozen_bn,
    )
    optimizer = finetune.make_optimizer(model, cfg["lr"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(2, 1, 16, 16, 8), torch.randint(0, 3, (2, 16, 16, 8))
    for step in range(3):
        finetune.apply_schedule(step, model, optimizer, cfg)
        loss = finetune.segmentation_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    norm_modules = {
        n for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm3d)
    }
    bn = {
        k
        for k in before
        if k.startswith("backbone.") and k.rsplit(".", 1)[0][len("backbone.") :] in norm_modules
    }
    assert any(k.startswith("head.") for k in changed)
    if frozen_bn == "eval":
        assert not any(k.startswith("backbone.") for k in changed)
    else:
        assert {k for k in changed if k.startswith("backbone.")} == bn
    group = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert group["backbone"] == 0 and group["backbone_bn"] == (
        0 if frozen_bn == "eval" else cfg["lr"]
    )


def test_finetune_freezes_then_trains_backbone(small_demo, backbone, tmp_path, monkeypatch):
    snapshots = []
    real = finetune.apply_schedule

    def recording(step, model, optimizer, cfg):
        snapshots.append((step, model.backbone.stem.weight.detach().clone()))
        real(step, model, optimizer, cfg)

    monkeypatch.setattr(finetune, "apply_schedule", recording)
    finetune.main(
        finetune.parse_args(
            [
                "--data",
                str(small_demo),
                "--checkpoint",
                str(backbone),
                "--out",
                str(tmp_path),
                *TINY,
                "--steps",
                "5",
                "--freeze-steps",
                "2",
                "--ramp-steps",
                "2",
            ]
        )
    )
    w = dict(snapshots)
    assert torch.equal(w[0], w[2])  # frozen for steps 0 and 1
    assert not torch.equal(w[2], w[4])  # trained after the freeze
    saved = torch.load(tmp_path / "model_fold0.pt", weights_only=True)
    assert (
        saved["kind"] == "segmenter" and saved["modality"] == "ct" and len(saved["test_dice"]) == 2
    )


def test_reestimated_batchnorm_statistics_are_the_plain_average(small_demo):
    """After reestimate_batchnorm, a BatchNorm's running mean is the mean of its inputs over the
    re-estimation batches (momentum None: cumulative), whatever it was before."""
    model = SegmentationModel(
        dict(in_channels=1, base_channels=2, num_levels=2), 9, head="nonlinear"
    )
    bn = model.backbone.encoder[0][0].body[0]
    bn.running_mean.fill_(100.0)
    seen = []
    bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().mean((0, 2, 3, 4))))
    cfg = dict(patch_size=(16, 16, 8), batch_size=2, bn_batches=5)
    ids = data.list_cases(data.read_dataset(small_demo)[1], labelled=True)
    finetune.reestimate_batchnorm(model, small_demo, ids, cfg, torch.device("cpu"), seed=0)
    assert len(seen) == 5  # --bn-batches 5: five batches, no more
    torch.testing.assert_close(bn.running_mean, torch.stack(seen).mean(0), rtol=1e-4, atol=1e-6)
    assert bn.momentum == 0.1


def test_paired_arms_receive_identical_inputs(small_demo, backbone, tmp_path):
    """The evidence's two arms (--checkpoint vs --init random, same --split, --train-cases, --draw
    and --seed) train on the same cases, the same batches in the same order, the same
    augmentation stream and the same head initialisation; only the backbone weights differ."""
    from weights import read_backbone

    common = [
        "--data",
        str(small_demo),
        "--split",
        "--train-cases",
        "1",
        "--draw",
        "1",
        "--seed",
        "1",
        *TINY[:-6],
        "--preset",
        "demo",
        "--aug",
        "nnunet-like",
    ]
    arms = {
        "pretrained": (
            finetune.parse_args(
                [
                    *common,
                    "--checkpoint",
                    str(backbone),
                    "--out",
                    str(tmp_path / "p"),
                    "--freeze-steps",
                    "1",
                    "--ramp-steps",
                    "1",
                ]
            ),
            read_backbone(backbone, verbose=False),
        ),
        "scratch": (
            finetune.parse_args([*common, "--init", "random", "--out", str(tmp_path / "s")]),
            None,
        ),
    }
    seen = {}
    for name, (args, file) in arms.items():
        info = data.read_dataset(small_demo)[1]
        ((fold, train, test),) = downstream.plan_folds(args, small_demo, info, info)
        model, _ = downstream.new_segmenter(args, file, 10, "nonlinear", torch.device("cpu"), fold)
        cfg = {k: getattr(args, k) for k in finetune.CONFIG}
        batches = list(finetune.make_loader(small_demo, train, cfg, args.seed, 0))
        g = torch.Generator().manual_seed(args.seed * 7919 + 29)
        augmented = [
            supervised_augment.supervised_augment(b["image"], b["label"], g, "nnunet-like")
            for b in batches
        ]
        seen[name] = dict(
            cases=(train, test),
            head={k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")},
            backbone=model.backbone.state_dict(),
            batches=augmented,
        )
    p, s = seen["pretrained"], seen["scratch"]
    assert p["cases"] == s["cases"]
    assert p["head"].keys() == s["head"].keys() and all(
        torch.equal(p["head"][k], s["head"][k]) for k in p["head"]
    )
    assert len(p["batches"]) == len(s["batches"]) == 3
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(p["batches"], s["batches"])
    )
    assert any(
        not torch.equal(p["backbone"][k], s["backbone"][k])
        for k in p["backbone"]
        if k.endswith("weight")
    )


# ----------------------------------------------------------------------------- what a run cannot
# honour


@pytest.mark.parametrize(
    "init, flags, words",
    [
        (
            "random",
            ["--warmup-steps", "5"],
            "--warmup-steps 5 is not shorter than --steps 3: the lr would never reach",
        ),
        (
            "random",
            ["--frozen-bn", "train"],
            "--frozen-bn has no effect in this run (with --init random nothing is frozen)",
        ),
        (
            "random",
            ["--freeze-steps", "2"],
            "--freeze-steps has no effect in this run (with --init random",
        ),
        (
            "checkpoint",
            ["--frozen-bn", "train", "--freeze-steps", "0", "--ramp-steps", "1"],
            "--frozen-bn has no effect in this run (with --freeze-steps 0 nothing is frozen)",
        ),
        (
            "checkpoint",
            ["--ramp-start-lr", "1e-4", "--freeze-steps", "1", "--ramp-steps", "0"],
            "--ramp-start-lr has no effect",
        ),
        (
            "random",
            ["--mirror-axes", "1", "2", "--aug", "none"],
            "--mirror-axes has no effect in this run (with --aug none",
        ),
        (
            "checkpoint",
            ["--freeze-steps", "10"],
            "--freeze-steps 10 + --ramp-steps 40 run past --steps 3: the backbone would never "
            "train",
        ),
        (
            "checkpoint",
            ["--freeze-steps", "2", "--ramp-steps", "5"],
            "run past --steps 3: the backbone would never reach --lr",
        ),
        (
            "random",
            ["--resume", "--force"],
            "--resume continues the run in --out, --force replaces it",
        ),
    ],
)
def test_finetune_refuses_what_the_run_cannot_honour(tmp_path, init, flags, words, capsys):
    start = ["--init", "random"] if init == "random" else ["--checkpoint", "unused.pt"]
    with pytest.raises(SystemExit) as e:
        finetune.parse_args(["--data", "d", *start, "--out", str(tmp_path / "ft"), *TINY, *flags])
    assert e.value.code == 2 and words in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "ft").exists()


def test_a_case_without_its_label_is_one_line_before_training(small_demo, tmp_path):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(small_demo, copy, ignore=shutil.ignore_patterns("raw", "unlabelled"))
    (copy / "cases" / "demo_001" / "label.npy").unlink()
    with pytest.raises(InputError, match="demo_001/label.npy: missing; re-run preprocess.py"):
        finetune.main(
            finetune.parse_args(
                ["--data", str(copy), "--init", "random", "--out", str(tmp_path / "o"), *TINY]
            )
        )
    assert not (tmp_path / "o").exists()


def test_a_diverged_fine_tuning_stops_and_saves_nothing(small_demo, tmp_path):
    """--lr 1e30: the loss is not finite; the fold stops with one line (exit 1 from the script),
    and neither a model nor results.json is written, so nothing can predict with it."""
    import runtime

    with pytest.raises(
        runtime.Diverged, match=r"fold 0: non-finite loss between steps 1 and 3; stopping, nothing"
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
                    "--lr",
                    "1e30",
                ]
            )
        )
    assert not list(tmp_path.glob("model_fold*.pt")) and not (tmp_path / "results.json").exists()


# ----------------------------------------------------------------------------- the run folder


def test_force_removes_every_fold_of_the_replaced_run(small_demo, tmp_path):
    """--force over a finished 2-fold run with --fold 0 leaves no model of the replaced run: a
    prediction from the folder then averages the new run's models only."""
    out = tmp_path / "ft"
    base = [
        "--data",
        str(small_demo),
        "--init",
        "random",
        "--out",
        str(out),
        *TINY[:-4],
        "--preset",
        "demo",
    ]
    finetune.main(finetune.parse_args(base))
    assert {p.name for p in out.glob("model_fold*.pt")} == {"model_fold0.pt", "model_fold1.pt"}
    before = {
        p.name: p.read_bytes()
        for p in out.iterdir()
        if p.is_file() and p.name not in (".lock", ".run.json")
    }
    with pytest.raises(
        InputError, match=r"holds a finished run \(model_fold0.pt, model_fold1.pt, results.json\)"
    ):
        finetune.main(finetune.parse_args([*base, "--fold", "0", "--base-channels", "8"]))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    finetune.main(finetune.parse_args([*base, "--fold", "0", "--base-channels", "8", "--force"]))
    assert sorted(p.name for p in out.glob("model_fold*.pt")) == ["model_fold0.pt"]
    assert json.loads((out / "results.json").read_text())["args"]["base_channels"] == 8


def test_killed_run_continues_with_resume_and_equals_an_uninterrupted_one(small_demo, tmp_path):
    """kill -9 while fold 1 trains; the same command with --resume keeps fold 0 and redoes fold 1;
    every tensor of every model, and results.json's numbers, equal an uninterrupted run's."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    flags = [
        "--data",
        str(small_demo),
        "--init",
        "random",
        *TINY[:-4],
        "--preset",
        "demo",
        "--steps",
        "30",
    ]
    cmd = lambda out, *extra: [
        sys.executable,
        str(ROOT / "finetune.py"),
        *flags,
        "--out",
        str(out),
        *extra,
    ]
    subprocess.run(cmd(tmp_path / "full"), env=env, check=True, capture_output=True, timeout=300)
    killed = subprocess.Popen(
        cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "model_fold0.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # inside fold 1's 30 steps (~3 s)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (
        not (tmp_path / "killed" / "results.json").exists()
        and not (tmp_path / "killed" / "model_fold1.pt").exists()
    )
    again = subprocess.run(
        cmd(tmp_path / "killed"), env=env, capture_output=True, text=True, timeout=300
    )
    assert (
        again.returncode == 2
        and "holds an unfinished run (model_fold0.pt): continue it with --resume" in again.stderr
    )
    resumed = subprocess.run(
        cmd(tmp_path / "killed", "--resume"), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0 and "fold 0: kept from the earlier run" in resumed.stdout, (
        resumed.stderr[-2000:]
    )
    for fold in (0, 1):
        a = torch.load(tmp_path / "full" / f"model_fold{fold}.pt", weights_only=True)
        b = torch.load(tmp_path / "killed" / f"model_fold{fold}.pt", weights_only=True)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), (
            fold
        )
        assert a["test_dice"] == b["test_dice"]
    ra, rb = (json.loads((tmp_path / f / "results.json").read_text()) for f in ("full", "killed"))
    assert ra["folds"] == rb["folds"] and ra["per_class"] == rb["per_class"]


@pytest.mark.parametrize("world", [2])
def test_finetune_under_torchrun_two_processes(small_demo, backbone, tmp_path, world):
    """DDP fine-tuning on CPU (gloo): freeze -> unfreeze re-wraps DDP; rank 0 alone evaluates and
    writes; the saved model loads in a single process."""
    from weights import load_segmenter

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        str(ROOT / "finetune.py"),
        "--data",
        str(small_demo),
        "--checkpoint",
        str(backbone),
        "--out",
        str(tmp_path),
        *TINY,
        "--batch-size",
        "2",
        "--steps",
        "4",
        "--freeze-steps",
        "2",
        "--ramp-steps",
        "1",
        "--device",
        "cpu",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("fold 0:") == 1  # one evaluation, by rank 0
    assert json.loads((tmp_path / "results.json").read_text())["mean_dice"] >= 0
    model, _ = load_segmenter(tmp_path / "model_fold0.pt")
    assert model.config["head"] == "nonlinear"
