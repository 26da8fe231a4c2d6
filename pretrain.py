"""Self-supervised pretraining of a 3D FPN with dense, hierarchically balanced voxel embeddings.

Implements Kats, Hirsch & Heinrich 2024, Sec. 2 (Fig. 2), on top of vox2vec (Goncharov et al. 2023):
two overlapping crops of a scan (Sec. 2.2), each augmented independently with local pixel
shuffling, local in-painting and a Bezier intensity curve (Sec. 2.1), one FPN forward for both,
balanced voxel representations sampled at n positive pairs, and the hybrid loss
L = L_c + lambda * L_r (Eq. 1-3) with InfoNCE at tau = 0.1 and MSE reconstruction at lambda = 10.

    python pretrain.py --data demo-unlabelled               # the demo preset on the demo's unlabelled corpus (CPU)
    python pretrain.py --data DATA_DIR --out runs/ct        # the paper's config (one GPU)
    python pretrain.py --data DATA_DIR --method vox2vec     # the vox2vec baseline (Table 1, row 1)
    python pretrain.py --data DATA_DIR --out runs/ct --resume       # continue an interrupted run
    torchrun --nproc_per_node=4 pretrain.py --data DATA_DIR         # several GPUs (DDP)

The paper's values are the flags' defaults (`--help`); `--preset demo` (the default for `--data
demo` and `demo-unlabelled`) replaces some with DEMO. A run writes `log.jsonl`, `checkpoint.pt`
(resumable) and `backbone.pt` (the FPN alone, for linear_probe.py / finetune.py) into --out, each
atomically, each loadable with `torch.load(..., weights_only=True)`. Table 1's ablations are
flags (--arch, --aug, --recon-weight, --contrastive-weight; --method vox2vec is the baseline's
preset); a neighbouring method (experiments/neighbours/) brings its own Method and calls main.

Deviations from the paper: InfoNCE is averaged over the 2n anchors, not summed (loss.py); the lr
may warm up and decay (--warmup-steps, --lr-schedule; the paper: constant).

Distributed: --batch-pairs is the GLOBAL batch and InfoNCE's negatives are gathered from every
process (runtime.gather_embeddings), so the loss is the single-process loss of the global batch.
Only rank 0 writes; checkpoints move freely between DDP and single-process runs. pretrain.py is
over the ~350-line guide because its command line (every flag of Table 1's ablations) and the
hook for the neighbouring methods (Method) live here, beside the loop they configure.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from augment import KINDS, augment_batch
from data import DATA_SPLIT, PairDataset, collate_pairs, list_cases, read_split
from downstream import init_from_file, save_backbone
from loss import hybrid_loss, info_nce, reconstruction_loss
from model import ARCHS, DEMO_ARCHS, PretrainModel
from preprocess import resolve_data_dir
from runtime import (append_row, claim_output, data_fingerprint, gather_embeddings, is_demo, non_negative_float,
                     non_negative_int, parse_with_presets, positive_float, positive_int, prepare_training,
                     release_folder, resume_training, save_training_state, setup_distributed, stop_non_finite,
                     training_autocast_dtype, truncate_log, world_info, wrap_ddp)

# The demo preset (demo.DEMO_SCALE volumes of ~52 x 45 x 20 voxels, model.DEMO_ARCHS network).
# The patch sets how far the two views of a pair move against each other relative to the patch:
# 24 x 24 x 8 on a demo volume moves them as much as the paper's patch on an abdominal CT
# (`python experiments/diagnostics.py --geometry`), so a CNN cannot match a pair by its position
# in the crop. Steps, lr, schedule and batch: the cell the recipe grid chose on the validation
# cases (experiments/pretrain_grid.py, docs/results.md).
DEMO = dict(steps=1260, batch_pairs=8, num_voxels=128, patch_size=(24, 24, 8), lr=3e-4, warmup_steps=0,
            lr_schedule="constant", log_every=10, checkpoint_every=100)
VOX2VEC = dict(arch="vox2vec", aug="vox2vec", recon_weight=0.0)   # --method vox2vec: the baseline
# Flags that say where and how to run, not what is trained: not part of a run's config.
RUN_FLAGS = ("data", "split", "out", "resume", "init_from", "workers", "preset", "device", "amp", "compile", "explicit", "method")
MAY_CHANGE_ON_RESUME = ("steps", "log_every", "checkpoint_every", "keep_steps")


# ----------------------------------------------------------------------------- the method (Sec. 2)

def build_model(cfg):
    backbone_config = dict(in_channels=1, base_channels=cfg["base_channels"], num_levels=cfg["num_levels"])
    return PretrainModel(backbone_config, arch=cfg["arch"])


def training_step(model, batch, cfg, generator, device, amp_dtype):
    """One forward of both augmented views; L_c (Eq. 1), L_r (Eq. 2), L (Eq. 3) -> (L, [L_c, L_r]).
    No host-device synchronisation happens in here."""
    B = batch["patches_a"].shape[0]
    xa = batch["patches_a"].to(device, non_blocking=True)  # (B, 1, X, Y, Z) un-augmented: the Eq. 2 target
    xb = batch["patches_b"].to(device, non_blocking=True)
    # View B's patches sit after view A's in the stacked batch; shifted on the host, before the copy.
    coords = torch.cat([batch["coords_a"], batch["coords_b"] + torch.tensor([B, 0, 0, 0])])  # (2N, 4)
    coords = coords.to(device, non_blocking=True)
    x = torch.cat([augment_batch(xa, generator, cfg["aug"]), augment_batch(xb, generator, cfg["aug"])])  # (2B, 1, X, Y, Z)
    x = x.contiguous(memory_format=torch.channels_last_3d)   # faster 3D convs on GPU and CPU alike
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        z, recon = model(x, coords)                        # (2N, 128), (2B, 1, X, Y, Z)
    N = batch["coords_a"].shape[0]
    za, zb, valid = gather_embeddings(z[:N], z[N:], cfg["num_voxels"] * B)
    l_c = info_nce(za, zb, cfg["temperature"], valid)                    # Eq. 1
    l_r = reconstruction_loss(recon[:B], xa, recon[B:], xb)              # Eq. 2
    return hybrid_loss(l_c, l_r, cfg["recon_weight"], cfg["contrastive_weight"]), [l_c, l_r]   # Eq. 3


class Method:
    """What the training loop needs from a pretraining method (the hook). The paper's is Ours;
    neighbours/*.py subclass this with their own flags, demo values, model and step."""
    name, script, arch, loss_names = "method", "pretrain.py", "balanced", ("loss",)
    demo = {}                      # this method's values in the demo preset

    def add_arguments(self, p):    # its own flags
        pass

    def presets(self, args):       # defaults that depend on a first parse (vox2vec's preset)
        return {}

    def check(self, cfg):          # ValueError, one line, for a config it cannot train
        pass

    def build_model(self, cfg):    # -> nn.Module with .backbone (the FPN saved in backbone.pt) and .config
        raise NotImplementedError

    def step(self, model, batch, cfg, generator, device, amp_dtype):   # -> (loss, [its parts])
        raise NotImplementedError

    def load_backbone(self, model, state):   # --init-from weights
        model.backbone.load_state_dict(state)

    def after_step(self, model, cfg):        # after the optimizer's step (an EMA update, ...)
        pass


class Ours(Method):
    """The paper's method (Sec. 2), and the vox2vec baseline as a preset of it."""
    name, loss_names = "ours", ("loss_contrastive", "loss_recon")

    def add_arguments(self, p):
        p.add_argument("--method", choices=["ours", "vox2vec"], default="ours",
                       help="ours (the paper), or the vox2vec baseline (VOX2VEC: its arch, augmentations, no L_r)")
        p.add_argument("--arch", choices=sorted(ARCHS), default="balanced", help="voxel representation (Sec. 2.2)")
        p.add_argument("--aug", choices=KINDS, default="local", help="augmentations (Sec. 2.1)")
        p.add_argument("--recon-weight", type=non_negative_float, default=10.0, help="lambda of Eq. 3; 0 = contrastive only")
        p.add_argument("--contrastive-weight", type=non_negative_float, default=1.0, help="weight of L_c; 0 = restorative only")
        p.add_argument("--temperature", type=positive_float, default=0.1, help="tau of Eq. 1")

    def presets(self, args):
        return VOX2VEC if args.method == "vox2vec" else {}

    def check(self, cfg):
        if cfg["recon_weight"] == 0 and cfg["contrastive_weight"] == 0:
            raise ValueError("--recon-weight and --contrastive-weight are both 0: nothing to train")

    def build_model(self, cfg):
        return build_model(cfg)

    def step(self, model, batch, cfg, generator, device, amp_dtype):
        return training_step(model, batch, cfg, generator, device, amp_dtype)


OURS = Ours()


# ----------------------------------------------------------------------------- setup

def resolve_config(args, method=OURS):
    """The run's config: every parsed setting that changes what is trained (paper defaults, the
    preset and the flags were already merged by parse_args), checked. ValueError, one line,
    naming the flag and a value that would work, for a setting the run cannot honour."""
    cfg = {k: v for k, v in vars(args).items() if k not in RUN_FLAGS}
    cfg["method"] = args.method if method is OURS else method.name
    cfg.setdefault("arch", method.arch)
    cfg["patch_size"] = tuple(cfg["patch_size"])
    if cfg["num_voxels"] > int(np.prod(cfg["patch_size"])):
        raise ValueError(f"--num-voxels {cfg['num_voxels']} is more than a {'x'.join(map(str, cfg['patch_size']))} "
                         f"patch holds ({int(np.prod(cfg['patch_size']))} voxels)")
    if cfg["batch_pairs"] % cfg["pairs_per_volume"]:
        raise ValueError(f"--batch-pairs {cfg['batch_pairs']} must be a multiple of --pairs-per-volume")
    late = [s for s in cfg["keep_steps"] if s > cfg["steps"]]
    if late:
        raise ValueError(f"--keep-steps {' '.join(map(str, late))}: past the end of the run (--steps {cfg['steps']}); "
                         f"give steps <= {cfg['steps']}")
    if cfg["warmup_steps"] >= cfg["steps"]:
        raise ValueError(f"--warmup-steps {cfg['warmup_steps']} is not shorter than --steps {cfg['steps']}: the lr "
                         f"would never reach --lr; give fewer than {cfg['steps']}")
    method.check(cfg)
    return cfg


def make_loader(data_dir, cfg, seed, start_step, rank, world, workers):
    """Item k of the dataset is a fixed function of (seed, k), and step s of rank r reads items
    [(s * world + r) * m, ... + m) with m pair-items per rank, so a resumed run and a run with
    another worker count see exactly the same data (data.py: per-item generators)."""
    per_rank = cfg["batch_pairs"] // world
    items = per_rank // cfg["pairs_per_volume"]
    dataset = PairDataset(data_dir, patch_size=cfg["patch_size"], num_voxels=cfg["num_voxels"],
                          pairs_per_volume=cfg["pairs_per_volume"], length=cfg["steps"] * world * items,
                          seed=seed, case_ids=cfg.get("cases"))
    order = [(s * world + rank) * items + j for s in range(start_step, cfg["steps"]) for j in range(items)]
    return torch.utils.data.DataLoader(
        dataset, batch_size=items, sampler=order, collate_fn=collate_pairs, num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)


def run_folder(args):
    return Path(args.out or ("runs/pretrain-demo" if args.data in ("demo", "demo-unlabelled") else "runs/pretrain"))


@dataclass
class Run:
    """What setup() hands the loop."""
    args: argparse.Namespace
    method: "Method"
    cfg: dict
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    folder: Path
    start: int
    device: torch.device


def setup(args, method):
    """Everything before the first step; every input problem is one line before any work."""
    rank, world, device = setup_distributed(args.device)
    cfg = resolve_config(args, method)
    if cfg["batch_pairs"] % (world * cfg["pairs_per_volume"]):
        raise ValueError(f"--batch-pairs {cfg['batch_pairs']} is the global batch: it must split evenly "
                         f"over {world} processes x --pairs-per-volume {cfg['pairs_per_volume']}")
    data_dir = resolve_data_dir(args.data)
    cfg.update(data=str(Path(data_dir).resolve()), data_fingerprint=data_fingerprint(data_dir))   # a resume checks both
    split = data_dir / "split.json" if args.split == DATA_SPLIT else args.split
    cfg["cases"] = read_split(split, list_cases(data_dir, labelled=True))["train"] if args.split else None
    folder = run_folder(args)
    torch.manual_seed(args.seed)
    init = init_from_file(args, cfg)
    model = method.build_model(cfg)
    if init is not None:
        method.load_backbone(model, init)
    # channels_last_3d: measured faster 3x3x3 convs on GPU and on this 2-core CPU alike (experiments/bench.py).
    model = model.to(device, memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=device.type == "cuda")
    if rank == 0:   # one run per folder: claimed before anything in it is read or written
        claim_output(folder, method.script, () if args.resume else ("checkpoint.pt", "log.jsonl"), what="run",
                     hint="continue it with --resume")
    # A resume may change the run's length and cadence; the length not under a schedule, whose shape it sets.
    may_change = [k for k in MAY_CHANGE_ON_RESUME if k != "steps" or cfg["lr_schedule"] == "constant"]
    start = resume_training(folder / "checkpoint.pt", model, optimizer, cfg, may_change) if args.resume else 0
    loader = make_loader(data_dir, cfg, args.seed, start, rank, world, args.workers)
    if rank == 0:
        if start > 0:
            truncate_log(folder / "log.jsonl", start)   # rows after the checkpoint are logged again
        print(f"pretrain: {world} process(es) on {device}, data {data_dir}, run dir {folder}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, starting at step {start}")
        print("config: " + json.dumps(cfg))
    return Run(args, method, cfg, model, optimizer, loader, folder, start, device)


# ----------------------------------------------------------------------------- the training loop

def train(run):
    """nanoGPT's order: augment + forward + loss -> backward -> clip -> lr -> step -> log /
    checkpoint. The step never waits for the device; the host reads it every --log-every steps only."""
    cfg, model, optimizer, device, method = run.cfg, run.model, run.optimizer, run.device, run.method
    rank, world = world_info()
    amp_dtype = training_autocast_dtype(device, run.args.amp, cfg["patch_size"], cfg["num_levels"])
    if rank == 0:
        print(f"precision: {'bf16 autocast' if amp_dtype else 'fp32'}")
    prepare_training(device)
    net = wrap_ddp(model, device)
    net = torch.compile(net) if run.args.compile else net
    generator = torch.Generator(device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)       # any non-finite loss since the last log
    sums = torch.zeros(1 + len(method.loss_names), device=device)
    t0, n_logged, step = time.time(), 0, run.start
    bar = tqdm(total=cfg["steps"], initial=run.start, disable=rank != 0, dynamic_ncols=True)
    keep = set(cfg["keep_steps"])
    if rank == 0 and run.start == 0 and 0 in keep:
        save_backbone(run.folder / "backbone_step0.pt", model, cfg, 0)
    model.train()
    for batch in run.loader:
        # Augmentations are a fixed function of (seed, step, rank): resuming reproduces them.
        generator.manual_seed((run.args.seed * 1_000_003 + step) * 64 + rank)
        loss, parts = method.step(net, batch, cfg, generator, device, amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        optimizer.step()
        method.after_step(model, cfg)
        step += 1
        bad |= ~torch.isfinite(loss.detach())
        sums += torch.stack([loss.detach(), *[p.detach() for p in parts]]).float()
        n_logged += 1
        bar.update(1)
        if rank == 0 and step in keep:
            save_backbone(run.folder / f"backbone_step{step}.pt", model, cfg, step)
        if step % cfg["log_every"] and step % cfg["checkpoint_every"] and step != cfg["steps"]:
            continue
        if world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            dist.all_reduce(sums)
            sums /= world
        if bad.item():   # the only host sync
            stop_non_finite(run.folder / "checkpoint.pt", step - n_logged + 1, step, method.script)
        mean = (sums / n_logged).tolist()
        row = dict(step=step, loss=mean[0], **dict(zip(method.loss_names, mean[1:])),
                   lr=optimizer.param_groups[0]["lr"], seconds=round(time.time() - t0, 3))
        sums.zero_()
        n_logged = 0
        if rank == 0:
            append_row(run.folder / "log.jsonl", row)
            bar.set_postfix(loss=f"{mean[0]:.4f}", **{n.replace("loss_", ""): f"{v:.4f}"
                                                      for n, v in zip(method.loss_names, mean[1:])})
            if step % cfg["checkpoint_every"] == 0 or step == cfg["steps"]:   # both loadable with weights_only=True
                save_training_state(run.folder / "checkpoint.pt", step, cfg, vars(run.args), model, optimizer)
                save_backbone(run.folder / "backbone.pt", model, cfg, step)
    bar.close()
    return step


def learning_rate(step, cfg):
    """The lr of step `step` (0-based): a linear warm-up over --warmup-steps, then constant
    (--lr-schedule constant, the paper's) or a half cosine from --lr to 0 at --steps (cosine)."""
    lr, warm = cfg["lr"], cfg["warmup_steps"]
    if step < warm:
        return lr * (step + 1) / warm
    if cfg["lr_schedule"] == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg["steps"] - warm)))
    return lr


def main(args, method=OURS):
    try:
        try:
            run = setup(args, method)
        except ValueError as e:
            sys.exit(f"{method.script}: error: {e}")
        step = train(run)
    except KeyboardInterrupt:
        last = run_folder(args) / "checkpoint.pt"
        sys.exit(f"{method.script}: interrupted; " + (f"the last checkpoint is {last}: continue with --resume"
                                                        if last.exists() else "no checkpoint was written yet"))
    finally:
        release_folder(run_folder(args))
    rank, world = world_info()
    if rank == 0:
        print(f"done: {step} steps; backbone for linear_probe.py / finetune.py: {run.folder / 'backbone.pt'}")
    if world > 1:
        dist.barrier()      # rank 0 may still be writing the last checkpoint: tear down together
        dist.destroy_process_group()
    return run.folder


# ----------------------------------------------------------------------------- command line

def build_parser(method=OURS):
    p = argparse.ArgumentParser(description=(method.__doc__ if method is not OURS else __doc__).split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    # Data and run folder
    p.add_argument("--data", required=True, help="preprocessed DATA_DIR (preprocess.py), 'demo' (the labelled "
                                                 "demo set) or 'demo-unlabelled' (its separate unlabelled corpus)")
    p.add_argument("--split", nargs="?", const=DATA_SPLIT, metavar="FILE",
                   help="pretrain on the 'train' cases of this split file only (without FILE: DATA/split.json, "
                        "which preprocess.py --demo writes): the labelled-pool control of experiments/evidence.py")
    p.add_argument("--out", help="run folder [runs/pretrain, or runs/pretrain-demo for --data demo]")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--init-from", help="start from these backbone weights: our backbone.pt or the authors' "
                                       "released files (README, 'Use the authors' weights'); they set the FPN's size")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--workers", type=non_negative_int, default=min(4, max(1, (os.cpu_count() or 2) - 1)),
                   help="DataLoader processes reading memory-mapped patches")
    p.add_argument("--preset", choices=["paper", "demo"],
                   help="demo replaces some defaults with pretrain.DEMO [demo for --data demo, else paper]")
    # Network (model.ARCHS; the demo preset: model.DEMO_ARCHS)
    p.add_argument("--base-channels", type=positive_int, default=ARCHS["balanced"]["base_channels"], help="FPN width at full resolution")
    p.add_argument("--num-levels", type=positive_int, default=ARCHS["balanced"]["num_levels"], help="FPN levels")
    # The method (Table 1 ablations, or a neighbouring method's own settings)
    method.add_arguments(p)
    # Optimisation (Sec. 3.2)
    p.add_argument("--steps", type=positive_int, default=50_000)
    p.add_argument("--batch-pairs", type=positive_int, default=10, help="patch pairs per step, global over processes")
    p.add_argument("--pairs-per-volume", type=positive_int, default=1, help="pairs cropped from one scan")
    p.add_argument("--num-voxels", type=positive_int, default=1024, help="positive pairs sampled per patch pair")
    p.add_argument("--patch-size", type=positive_int, nargs=3, default=(128, 128, 32), help="(X, Y, Z) voxels")
    p.add_argument("--lr", type=non_negative_float, default=3e-4, help="Adam learning rate (the peak, with a schedule)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear lr warm-up over these first steps")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="after the warm-up: constant, or a half cosine down to 0 at --steps")
    p.add_argument("--grad-clip", type=positive_float, default=1.0, help="gradient-norm clip (the reference's)")
    # Logging, checkpoints and speed
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between log rows (and the only host syncs)")
    p.add_argument("--checkpoint-every", type=positive_int, default=1000)
    p.add_argument("--keep-steps", type=non_negative_int, nargs="*", default=[],
                   help="also keep OUT/backbone_step<N>.pt at these steps (0: the initialisation), for a "
                        "probe at several points of pretraining")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on a GPU, or on a CPU with bf16 instructions (avx512_bf16 / AMX); fp32 elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p


def parse_args(argv=None, method=OURS):
    """The paper's defaults, then the presets (a method's, the demo's), then the flags given."""
    def presets(first, explicit):
        defaults = dict(method.presets(first))
        arch = first.arch if "arch" in explicit else defaults.get("arch", method.arch)
        defaults.update((DEMO_ARCHS if is_demo(first) else ARCHS)[arch])
        if is_demo(first):
            defaults.update(DEMO, **method.demo)
        return defaults
    return parse_with_presets(build_parser(method), argv, presets)


if __name__ == "__main__":
    main(parse_args())
