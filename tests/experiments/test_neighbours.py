"""The neighbouring methods (README, "Neighbouring methods"): Models Genesis, masked image
modelling, DenseCL (experiments/neighbours/genesis.py, mim.py, densecl.py: pretrain.py's loop with
their own
step) and MedContext (experiments/neighbours/medcontext.py: finetune.py's loop with its own step).
Each method-specific piece against a naive reference or an invariant, then real training
steps: weights change, backbone.pt loads downstream, resume equals an uninterrupted run."""

import math

import numpy as np
import pytest
import torch

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import loss
import model
import pretrain
from experiments.neighbours import common, densecl, genesis, medcontext, mim
from weights import read_backbone

ROOT = Path(__file__).resolve().parents[2]
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
METHODS = {"genesis": genesis, "mim": mim, "densecl": densecl}
STEPS = {"genesis": genesis.genesis_step, "mim": mim.mim_step, "densecl": densecl.densecl_step}
LOSSES = {
    "genesis": {"loss_recon"},
    "mim": {"loss_masked_l1"},
    "densecl": {"loss_global", "loss_dense"},
}


def run(data, out, method, *extra):
    module = METHODS[method]
    return module.main(module.parse_args(["--data", str(data), "--out", str(out), *TINY, *extra]))


def read_log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- masks (mim,
# MedContext)


@pytest.mark.parametrize("ratio, block", [(0.75, (4, 4, 2)), (0.5, (3, 5, 2)), (0.4, (2, 2, 1))])
def test_block_mask_ratio_is_honoured(ratio, block):
    shape, g = (64, 1, 16, 15, 8), torch.Generator().manual_seed(0)
    mask = common.block_mask(shape, g, ratio, block)
    assert mask.shape == (64, 1, 16, 15, 8) and mask.dtype == torch.bool
    cells = [math.ceil(d / b) for d, b in zip(shape[2:], block)]
    n = cells[0] * cells[1] * cells[2]
    for m in mask[:, 0]:
        # every cell is all-masked or all-visible, and exactly round(ratio * n) cells are masked
        starts = [range(0, d, b) for d, b in zip(shape[2:], block)]
        states = [
            m[x : x + block[0], y : y + block[1], z : z + block[2]]
            for x in starts[0]
            for y in starts[1]
            for z in starts[2]
        ]
        assert all(s.all() or not s.any() for s in states)
        assert sum(bool(s.all()) for s in states) == round(ratio * n)
    # voxel fraction: exact for whole cells, within sampling error where the border cuts cells
    fraction = mask.float().mean().item()
    assert abs(fraction - ratio) < 3 * math.sqrt(ratio * (1 - ratio) / (64 * n)) + 0.02
    per_position = mask.float().mean(0)  # every position is masked equally often
    assert per_position.min() > ratio - 0.25 and per_position.max() < ratio + 0.25


def test_column_mask_is_the_same_on_every_slice():
    mask = common.block_mask((3, 1, 16, 16, 8), torch.Generator().manual_seed(1), 0.5, (4, 4, 8))
    assert torch.equal(mask, mask[..., :1].expand_as(mask))
    assert mask.float().mean().item() == 0.5


def test_masked_l1_ignores_unmasked_voxels():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.rand(2, 1, 8, 8, 4, generator=g), torch.rand(2, 1, 8, 8, 4, generator=g)
    mask = common.block_mask(pred.shape, g, 0.75, (2, 2, 2))
    naive = np.mean(
        [
            abs(p - t)
            for p, t, m in zip(
                pred.flatten().tolist(), target.flatten().tolist(), mask.flatten().tolist()
            )
            if m
        ]
    )
    assert mim.masked_l1(pred, target, mask).item() == pytest.approx(naive, rel=1e-6)
    changed = torch.where(mask, pred, pred + 100.0)  # anything at the visible voxels
    assert mim.masked_l1(changed, target, mask).item() == pytest.approx(naive, rel=1e-6)
    pred.requires_grad_(True)
    mim.masked_l1(pred, target, mask).backward()
    assert (pred.grad[~mask] == 0).all() and (pred.grad[mask] != 0).all()


def test_mim_input_hides_exactly_the_masked_voxels():
    net = common.RestorativeModel(
        dict(in_channels=1, base_channels=4, num_levels=2), mask_token=True
    )
    with torch.no_grad():
        net.mask_token.fill_(-7.0)
    seen = []
    net.backbone.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    x = torch.rand(2, 1, 8, 8, 4)
    mask = common.block_mask(x.shape, torch.Generator().manual_seed(3), 0.75, (2, 2, 2))
    net(x, mask).sum().backward()
    assert torch.equal(seen[0][mask], torch.full((int(mask.sum()),), -7.0))
    assert torch.equal(seen[0][~mask], x[~mask])
    assert (
        net.mask_token.grad is not None and net.mask_token.grad.abs().item() > 0
    )  # the value is learned


# ----------------------------------------------------------------------------- Models Genesis


def test_outpainting_keeps_exactly_the_inner_box():
    x = torch.rand(16, 1, 21, 14, 7, generator=torch.Generator().manual_seed(4)) * 0.5 + 0.25
    out = genesis.local_outpaint(x, torch.Generator().manual_seed(5))
    keep = genesis.outpaint_box(x.shape, torch.Generator().manual_seed(5))  # the same draws
    for b in range(16):
        box = torch.nonzero(keep[b, 0])
        lo, hi = box.min(0).values, box.max(0).values + 1
        sides = (hi - lo).tolist()
        assert int(keep[b].sum()) == sides[0] * sides[1] * sides[2]  # one solid box
        for side, d in zip(sides, (21, 14, 7)):
            assert round(d * 3 / 7) <= side <= round(d * 4 / 7)
        inner = (slice(None), slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        assert torch.equal(out[b][inner], x[b][inner])  # kept exactly
        outside = out[b][~keep[b]]
        assert (outside != x[b][~keep[b]]).float().mean() > 0.99  # the rest is noise
        assert outside.min() < 0.2 and outside.max() > 0.8  # U[0, 1), not the image


def test_genesis_corruption_paints_in_or_out():
    x = torch.rand(32, 1, 16, 16, 8, generator=torch.Generator().manual_seed(6)) * 0.5 + 0.25
    g = torch.Generator().manual_seed(7)
    only_out = genesis.genesis_corrupt(
        x, g, shuffle_prob=0, bezier_prob=0, paint_prob=1, outpaint_prob=1
    )
    kept = (only_out == x).float().mean((1, 2, 3, 4))
    assert (
        (kept > 3**3 / 7**3 * 0.8) & (kept < 4**3 / 7**3 * 1.2)
    ).all()  # one inner box per patch
    only_in = genesis.genesis_corrupt(
        x, g, shuffle_prob=0, bezier_prob=0, paint_prob=1, outpaint_prob=0
    )
    assert ((only_in == x).float().mean((1, 2, 3, 4)) > 0.4).all()  # holes, not a box
    assert torch.equal(
        genesis.genesis_corrupt(x, g, shuffle_prob=0, bezier_prob=0, paint_prob=0), x
    )
    default = genesis.genesis_corrupt(x, g)
    assert default.shape == x.shape and default.min() >= 0 and default.max() <= 1


# ----------------------------------------------------------------------------- DenseCL


def test_dense_matching_picks_the_most_similar_key():
    g = torch.Generator().manual_seed(8)
    fq, fk = (
        torch.randn(3, 5, 7, generator=g),
        torch.randn(3, 5, 9, generator=g) * 3,
    )  # scale must not matter
    match = densecl.dense_matches(fq, fk)
    for b in range(3):
        for s in range(7):
            cosines = [
                float(fq[b, :, s] @ fk[b, :, t] / (fq[b, :, s].norm() * fk[b, :, t].norm()))
                for t in range(9)
            ]
            assert match[b, s].item() == int(np.argmax(cosines))


def test_queue_is_first_in_first_out():
    queue = densecl.Queue(5, 2)
    keys = torch.arange(16, dtype=torch.float32).view(8, 2)
    queue.enqueue(keys[:3])
    assert torch.equal(queue.keys[:3], keys[:3]) and queue.ptr.item() == 3
    queue.enqueue(keys[3:6])  # wraps: rows 3, 4, then 0 overwritten (the oldest)
    assert torch.equal(queue.keys, torch.stack([keys[5], keys[1], keys[2], keys[3], keys[4]]))
    assert queue.ptr.item() == 1
    queue.enqueue(keys[6:8])
    assert torch.equal(queue.keys, torch.stack([keys[5], keys[6], keys[7], keys[3], keys[4]]))
    with pytest.raises(ValueError, match="more than the queue size"):
        queue.enqueue(torch.zeros(6, 2))
    state = queue.state_dict()  # saved in checkpoints: resumes where it was
    assert set(state) == {"keys", "ptr"}


def test_densecl_loss_matches_naive_formula():
    g = torch.Generator().manual_seed(9)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)
    B, D, S, K, tau, lam = 2, 4, 3, 6, 0.2, 0.5
    qg, kg, queue_g, queue_d = unit(B, D), unit(B, D), unit(K, D), unit(K, D)
    qd, kd = unit(B, S, D).permute(0, 2, 1), unit(B, S, D).permute(0, 2, 1)  # (B, D, S)
    match = torch.tensor([[2, 0, 0], [1, 1, 2]])

    def nce(q, pos, negatives):
        logits = [float(q @ pos) / tau] + [float(q @ n) / tau for n in negatives]
        return -logits[0] + math.log(sum(math.exp(v) for v in logits))

    naive_global = np.mean([nce(qg[b], kg[b], queue_g) for b in range(B)])
    naive_dense = np.mean(
        [nce(qd[b, :, s], kd[b, :, match[b, s]], queue_d) for b in range(B) for s in range(S)]
    )
    total, l_global, l_dense = densecl.densecl_loss(
        qg, kg, queue_g, qd, kd, match, queue_d, tau, lam
    )
    assert l_global.item() == pytest.approx(naive_global, rel=1e-5)
    assert l_dense.item() == pytest.approx(naive_dense, rel=1e-5)
    assert total.item() == pytest.approx((1 - lam) * naive_global + lam * naive_dense, rel=1e-5)


def test_ema_moves_by_the_momentum_rule_and_takes_no_gradient():
    torch.manual_seed(0)
    student = model.SegmentationModel(
        dict(in_channels=1, base_channels=4, num_levels=2), 3, "nonlinear"
    )
    teacher = common.frozen_copy(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher.parameters()]
    common.ema_update(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s, rtol=0, atol=1e-6)


def test_medcontext_teacher_gets_no_gradient_and_follows_the_student():
    torch.manual_seed(0)
    args = argparse.Namespace(
        patch_size=(8, 8, 4),
        mc_mask_block=(2, 2, 2),
        mc_momentum=0.9,
        mc_beta=0.5,
        mc_mask_ratio=0.5,
        mc_mask_shape="cube",
        seed=0,
    )
    student = model.SegmentationModel(
        dict(in_channels=1, base_channels=4, num_levels=2), 3, "nonlinear"
    )
    hooks = medcontext.hooks(
        student, {}, args, argparse.Namespace(device=torch.device("cpu")), fold=0
    )
    teacher = hooks["step"].teacher
    x, y = torch.rand(2, 1, 8, 8, 4), torch.randint(0, 3, (2, 8, 8, 4))
    value = hooks["step"](hooks["net"], x, y)
    value.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # the loss is the three terms of MedContext, with the mask its generator drew (the same seed
    # again)
    mask = common.block_mask(x.shape, torch.Generator().manual_seed(17), 0.5, (2, 2, 2))
    with torch.no_grad():
        masked = torch.where(mask, 0.0, x)
        clean, on_masked = (
            student(x),
            student(masked),
        )  # two batches (train mode: own BN statistics)
        expected = (
            loss.segmentation_loss(clean, y)
            + loss.segmentation_loss(on_masked, y)
            + 0.5 * torch.mean((on_masked - teacher(x)) ** 2)
        )
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0.4 < mask.float().mean().item() < 0.6
    before = [p.clone() for p in teacher.parameters()]
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    hooks["after_step"](student)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["genesis", "mim", "densecl"])
def test_steps_change_the_weights(small_demo, tmp_path, method):
    extra = ["--dense-level", "1", "--queue-size", "8"] if method == "densecl" else []
    module = METHODS[method]
    setup = pretrain.setup(
        module.parse_args(["--data", str(small_demo), "--out", str(tmp_path), *TINY, *extra]),
        module.build_model,
    )
    net, cfg = setup.model, setup.cfg
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _, batch in zip(range(3), setup.loader):
        value, parts = STEPS[method](net, batch, cfg, g, torch.device("cpu"), None)
        assert torch.isfinite(value) and set(parts) == LOSSES[method]
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        if method == "densecl":
            key_before = [p.clone() for p in net.key.parameters()]
            densecl.momentum_update(net, cfg)
            assert all(p.grad is None for p in net.key.parameters())
            for k, b, q in zip(net.key.parameters(), key_before, net.query.parameters()):
                torch.testing.assert_close(
                    k, cfg["ema_momentum"] * b + (1 - cfg["ema_momentum"]) * q, rtol=0, atol=1e-6
                )
    after = net.state_dict()
    trained = [k for k in before if k.endswith("weight") and not k.startswith("key.")]
    unchanged = {k for k in trained if torch.equal(before[k], after[k])}
    # DenseCL reads the FPN at --dense-level (1 here) and the coarsest level: the decoder below
    # that level gets no signal and keeps its initialisation (DenseCL pretrains an encoder only)
    below = {
        k
        for k in trained
        if any(k.startswith(f"query.backbone.{part}.0.") for part in ("lateral", "skip", "decoder"))
    }
    assert unchanged == (below if method == "densecl" else set()), unchanged ^ below
    if method == "densecl":
        assert after["queue_global.ptr"].item() == 3 * 2 % 8  # 2 keys a step, 3 steps
        key_weights = [k for k in before if k.startswith("key.") and k.endswith("weight")]
        moved = {
            k for k in key_weights if (before[k] - after[k]).abs().max() > 1e-6
        }  # not float rounding
        assert moved == {
            k for k in key_weights if "query." + k[len("key.") :] not in unchanged
        }  # it followed


@pytest.mark.parametrize("method", ["genesis", "mim", "densecl"])
def test_backbone_file_and_resume(small_demo, tmp_path, method):
    extra = ["--checkpoint-every", "2"] + (
        ["--queue-size", "4", "--dense-level", "1"] if method == "densecl" else []
    )
    run(small_demo, tmp_path / "full", method, "--steps", "4", *extra)
    run(small_demo, tmp_path / "split", method, "--steps", "2", *extra)
    run(small_demo, tmp_path / "split", method, "--steps", "4", "--resume", *extra)
    full, split = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert set(full[0]) == {"step", "loss", "lr", "seconds", *LOSSES[method]}
    for a, b in zip(full, split):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
    sa = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["model"]
    for k in sa:  # the queue and the key encoder included
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    config, state, info = read_backbone(
        tmp_path / "full" / "backbone.pt"
    )  # what probe / fine-tune read
    assert config == dict(in_channels=1, base_channels=4, num_levels=3)
    fpn = model.FPN3d(**config)
    fpn.load_state_dict(state)
    assert info["method"] == method


def test_init_from_starts_densecl_key_encoder_as_the_loaded_query(small_demo, tmp_path):
    from weights import read_backbone as read

    run(
        small_demo,
        tmp_path / "a",
        "densecl",
        "--steps",
        "1",
        "--queue-size",
        "4",
        "--dense-level",
        "1",
    )
    setup = pretrain.setup(
        densecl.parse_args(
            [
                "--data",
                str(small_demo),
                "--out",
                str(tmp_path / "b"),
                *TINY,
                "--queue-size",
                "4",
                "--dense-level",
                "1",
                "--init-from",
                str(tmp_path / "a"),
            ]
        ),
        densecl.build_model,
    )
    _, state, _ = read(tmp_path / "a" / "backbone.pt")
    assert all(torch.equal(setup.model.key.backbone.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize(
    "argv, module, message",
    [
        (["--mask-ratio", "0.5"], pretrain, "unrecognized arguments: --mask-ratio"),
        (["--recon-weight", "3"], genesis, "unrecognized arguments: --recon-weight"),
        (["--mask-ratio", "1.5"], mim, "argument --mask-ratio: must be in (0, 1)"),
        (["--queue-size", "1"], densecl, "--queue-size 1 is smaller than one step's keys (2)"),
        (["--dense-level", "3"], densecl, "--dense-level 3 outside the FPN's levels 0..2"),
        (
            ["--mask-block", "16", "16", "8"],
            mim,
            "--mask-block 16 16 8 in a 16x16x8 patch masks 100% of it, not the 75%",
        ),
        (
            ["--mask-block", "32", "32", "16"],
            mim,
            "--mask-block 32 32 16: the block is larger than the 16x16x8 patch "
            "(X 32 > 16, Y 32 > 16, Z 16 > 8)",
        ),
    ],
)
def test_method_flags_are_checked_where_they_are_parsed(
    small_demo, tmp_path, argv, module, message, capsys
):
    """A method's flags exist only in its own file (anywhere else argparse refuses them), and one
    it cannot honour is refused where it is parsed, before any folder is made."""
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--data", str(small_demo), "--out", str(tmp_path / "o"), *TINY, *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("finetune", ["--mc-beta", "2"], "unrecognized arguments: --mc-beta"),
        ("medcontext", ["--mc-mask-ratio", "1.2"], "argument --mc-mask-ratio: must be in (0, 1)"),
        (
            "medcontext",
            ["--mc-mask-block", "64", "64", "16", "--patch-size", "16", "16", "8"],
            "--mc-mask-block 64 64 16: the block is larger than the 16x16x8",
        ),
        (
            "medcontext",
            [
                "--mc-mask-shape",
                "column",
                "--mc-mask-block",
                "64",
                "4",
                "4",
                "--patch-size",
                "16",
                "16",
                "8",
            ],
            "--mc-mask-block 64 4 4: the block is larger than the 16x16x8 patch (X 64 > 16)",
        ),
    ],
)
def test_medcontext_flags_are_checked_before_any_folder_is_made(
    small_demo, tmp_path, script, argv, message, capsys
):
    import finetune

    module = finetune if script == "finetune" else medcontext
    with pytest.raises(SystemExit) as e:
        module.parse_args(
            ["--data", str(small_demo), "--init", "random", "--out", str(tmp_path / "run"), *argv]
        )
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "script, extra",
    [
        ("experiments/neighbours/densecl.py", ["--dense-level", "1", "--queue-size", "8"]),
        ("experiments/neighbours/medcontext.py", None),
    ],
)
def test_under_torchrun_two_processes(small_demo, tmp_path, script, extra):
    """DenseCL: keys gathered from both ranks before they are queued, the checkpoint resumes in one
    process. MedContext: its two-input forward and teacher under DDP, rank 0 alone evaluates."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if extra is not None:
        flags = [*TINY, "--steps", "3", "--batch-pairs", "4", *extra]
    else:
        flags = [
            "--init",
            "random",
            "--steps",
            "4",
            "--batch-size",
            "2",
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
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / script),
        "--data",
        str(small_demo),
        "--out",
        str(tmp_path),
        *flags,
        "--device",
        "cpu",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    if extra is None:
        assert (
            result.stdout.count("fold 0:") == 1
            and json.loads((tmp_path / "results.json").read_text())["mean_dice"] >= 0
        )
        return
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    run(small_demo, tmp_path, "densecl", "--steps", "4", "--batch-pairs", "4", "--resume", *extra)
    assert read_log(tmp_path)[-1]["step"] == 4
    # 4 pairs a step (2 per rank, both ranks' keys queued): 3 steps x 4, then 1 step x 4 alone
    queue = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]["queue_global.ptr"]
    assert queue.item() == (3 * 4 + 4) % 8
