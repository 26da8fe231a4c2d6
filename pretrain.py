"""Self-supervised pretraining of a 3D FPN with dense, hierarchically balanced voxel embeddings
(Kats, Hirsch & Heinrich 2024, Sec. 2, Fig. 2; built on vox2vec, Goncharov et al. 2023).

    python pretrain.py --data demo                          # the demo preset on the demo's unlabelled corpus (CPU)
    python pretrain.py --data DATA_DIR --out runs/ct        # the paper's config (one GPU)
    python pretrain.py --data DATA_DIR --method vox2vec     # the vox2vec baseline (Table 1, row 1)
    python pretrain.py --data DATA_DIR --out runs/ct --resume       # continue an interrupted run
    torchrun --nproc_per_node=4 pretrain.py --data DATA_DIR         # several GPUs (DDP)

One step (training_step): two overlapping crops of a scan (Sec. 2.1), each augmented by its own
t ~ T, one FPN forward for both, balanced voxel representations at n positive pairs (Sec. 2.2),
and L = L_c + lambda L_r (Eq. 1-3, tau = 0.1, lambda = 10). The loop (train): batch, step,
optimizer, log (Log), checkpoint (save_state). The paper's values are the flags' defaults;
`--preset demo` (the default for `--data demo`) replaces some with DEMO. A run writes log.jsonl,
checkpoint.pt (resumable) and backbone.pt (the FPN alone, with how its corpus was preprocessed)
into --out, each atomically. Table 1's ablations are flags; a neighbouring method
(experiments/neighbours/) passes its own model and step to main. A multi-channel corpus is read
as one volume per channel (the backbone is single-channel, as the paper's).

Deviations: InfoNCE is averaged over the 2n anchors, not summed (loss.py); the lr may warm up
and decay (--warmup-steps, --lr-schedule; the paper and the demo: constant). Under torchrun
--batch-pairs is the global batch and InfoNCE's negatives are gathered from every process
(runtime.gather_embeddings): the loss is the single-process loss of the global batch.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

import runtime
from augment import KINDS, augment_batch
from data import PairDataset, collate_pairs, data_folder, fingerprint, list_cases, preprocessing, read_split, step_loader
from loss import hybrid_loss, info_nce, reconstruction_loss
from model import ARCHS, DEMO_ARCHS, PretrainModel, training_bytes
from runtime import non_negative_float, non_negative_int, positive_float, positive_int, world_info
from weights import check_backbone_flags, load_checkpoint, read_backbone, save_backbone, save_checkpoint

# The demo preset (demo.DEMO_SCALE volumes of ~52 x 45 x 20 voxels, model.DEMO_ARCHS network).
# The patch sets how far the two views of a pair move against each other relative to the patch:
# 24 x 24 x 8 on a demo volume moves them as much as the paper's patch on an abdominal CT
# (`python experiments/diagnostics.py --geometry`). Steps, lr, schedule and batch: the cell the
# recipe grid chose on the validation cases (docs/results.md).
DEMO = dict(steps=1260, batch_pairs=8, num_voxels=128, patch_size=(24, 24, 8), lr=3e-4, warmup_steps=0,
            lr_schedule="constant", log_every=10, checkpoint_every=100)
VOX2VEC = dict(arch="vox2vec", aug="vox2vec", recon_weight=0.0)   # --method vox2vec: the baseline
# Flags that say where and how to run, not what is trained: not part of a run's config.
RUN_FLAGS = ("data", "split", "out", "resume", "force", "init_from", "workers", "preset", "device", "amp", "compile",
             "given")
MAY_CHANGE_ON_RESUME = ("steps", "log_every", "checkpoint_every")


# ----------------------------------------------------------------------------- the method (Sec. 2)

def build_model(cfg, backbone_state=None):
    """The network of Fig. 2 (model.PretrainModel), its FPN loaded from --init-from's weights if given."""
    model = PretrainModel(dict(in_channels=1, base_channels=cfg["base_channels"], num_levels=cfg["num_levels"]),
                          arch=cfg["arch"])
    if backbone_state is not None:
        model.backbone.load_state_dict(backbone_state)
    return model


def training_step(model, batch, cfg, generator, device, amp_dtype):
    """One forward of both augmented views; L_c (Eq. 1), L_r (Eq. 2), L (Eq. 3) -> (L, its parts).
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
    za, zb, valid = runtime.gather_embeddings(z[:N], z[N:], cfg["num_voxels"] * B)
    l_c = info_nce(za, zb, cfg["temperature"], valid)                    # Eq. 1
    l_r = reconstruction_loss(recon[:B], xa, recon[B:], xb)              # Eq. 2
    loss = hybrid_loss(l_c, l_r, cfg["recon_weight"], cfg["contrastive_weight"])   # Eq. 3
    return loss, dict(loss_contrastive=l_c, loss_recon=l_r)


# ----------------------------------------------------------------------------- the run

def setup(args, build=build_model):
    """Everything before the first step, every input problem one line before any work -> the run:
    namespace(cfg, model, optimizer, loader, folder, start, device, amp_dtype, args)."""
    rank, world, device = runtime.setup_distributed(args.device)
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items() if k not in RUN_FLAGS}
    if cfg["batch_pairs"] % (world * cfg["pairs_per_volume"]):
        raise ValueError(f"--batch-pairs {cfg['batch_pairs']} is the global batch: it must split evenly "
                         f"over {world} processes x --pairs-per-volume {cfg['pairs_per_volume']}")
    data_dir = data_folder(args.data, demo_part="unlabelled")
    cfg.update(data=str(data_dir.resolve()), data_fingerprint=fingerprint(data_dir),   # a resume checks both
               preprocessing=preprocessing(data_dir))                                 # backbone.pt keeps it
    split = data_dir / "split.json" if args.split is True else args.split
    cfg["cases"] = read_split(split, list_cases(data_dir, labelled=True))["train"] if args.split else None
    init = None
    if args.init_from:      # ours or the authors' released weights: the file decides the FPN's size
        config, init, _ = read_backbone(args.init_from)
        check_backbone_flags(args, config, args.init_from)
        cfg.update(base_channels=config["base_channels"], num_levels=config["num_levels"], init_from=str(args.init_from))
    torch.manual_seed(args.seed)
    model = build(cfg, init)
    per_rank = cfg["batch_pairs"] // world
    runtime.check_memory(training_bytes(model.backbone.channels, cfg["patch_size"], 2 * per_rank,
                                        cfg["batch_pairs"] * cfg["num_voxels"]),
                         device, f"a step of {per_rank} pairs of {'x'.join(map(str, cfg['patch_size']))} patches")
    items = per_rank // cfg["pairs_per_volume"]
    dataset = PairDataset(data_dir, cfg["patch_size"], cfg["num_voxels"], cfg["pairs_per_volume"],
                          length=cfg["steps"] * world * items, seed=args.seed, case_ids=cfg["cases"])
    folder = Path(args.out or ("runs/pretrain-demo" if args.data == "demo" else "runs/pretrain"))
    if rank == 0:   # one run per folder: claimed before anything in it is read or written
        runtime.claim_run(folder, "pretrain.py", ("checkpoint.pt", "log.jsonl", "backbone*.pt"), settings=cfg,
                          force=args.force, resume=args.resume,
                          may_change=[k for k in MAY_CHANGE_ON_RESUME if k != "steps" or cfg["lr_schedule"] == "constant"])
    model = model.to(device, memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=device.type == "cuda")
    start = load_checkpoint(folder / "checkpoint.pt", model, optimizer) if args.resume else 0
    loader = step_loader(dataset, cfg["steps"], items, rank, world, start, args.workers, collate_pairs)
    amp_dtype = runtime.training_dtype(device, args.amp, model.backbone.channels, cfg["patch_size"])
    if rank == 0:
        if start > 0:
            runtime.truncate_log(folder / "log.jsonl", start)   # rows after the checkpoint are logged again
        print(f"pretrain: {world} process(es) on {device} ({'bf16 autocast' if amp_dtype else 'fp32'}), data {data_dir}, "
              f"run dir {folder}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, starting at "
              f"step {start}\nconfig: {json.dumps(cfg)}")
    return SimpleNamespace(cfg=cfg, model=model, optimizer=optimizer, loader=loader, folder=folder, start=start,
                           device=device, amp_dtype=amp_dtype, args=args)


# ----------------------------------------------------------------------------- the training loop

def train(run, step=training_step, after_step=None):
    """nanoGPT's order: batch -> augment + forward + loss (step) -> backward -> clip -> lr -> optimizer
    -> log -> checkpoint. The host reads the device every --log-every steps only."""
    cfg, model, optimizer, device = run.cfg, run.model, run.optimizer, run.device
    rank = world_info()[0]
    runtime.prepare_training(device)
    net = runtime.wrap_ddp(model, device)
    net = torch.compile(net) if run.args.compile else net
    generator = torch.Generator(device=device)
    log = Log(run)
    model.train()
    for s, batch in enumerate(run.loader, start=run.start):
        # Augmentations are a fixed function of (seed, step, rank): resuming reproduces them.
        generator.manual_seed((run.args.seed * 1_000_003 + s) * 64 + rank)
        loss, parts = step(net, batch, cfg, generator, device, run.amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(s, cfg)
        optimizer.step()
        if after_step is not None:
            after_step(model, cfg, s + 1)
        log.step(s + 1, loss, parts)
        if rank == 0:
            save_state(run, s + 1)
    log.bar.close()
    return run.start + len(run.loader)


def learning_rate(step, cfg):
    """The lr of step `step` (0-based): a linear warm-up over --warmup-steps, then constant
    (--lr-schedule constant, the paper's) or a half cosine from --lr to 0 at --steps (cosine)."""
    lr, warm = cfg["lr"], cfg["warmup_steps"]
    if step < warm:
        return lr * (step + 1) / warm
    if cfg["lr_schedule"] == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg["steps"] - warm)))
    return lr


class Log:
    """Logging: the losses summed on the device; every --log-every steps (and at every checkpoint)
    one host read, a stop on a non-finite loss, and a log.jsonl row (rank 0)."""

    def __init__(self, run):
        self.run, self.sums, self.count, self.t0 = run, None, 0, time.time()
        self.bar = tqdm(total=run.cfg["steps"], initial=run.start, disable=world_info()[0] != 0, dynamic_ncols=True)

    def step(self, step, loss, parts):
        cfg, world = self.run.cfg, world_info()[1]
        values = torch.stack([loss.detach(), *(p.detach() for p in parts.values())]).float()
        self.sums = values if self.sums is None else self.sums + values     # a non-finite value stays so
        self.count += 1
        self.bar.update(1)
        if step % cfg["log_every"] and step % cfg["checkpoint_every"] and step != cfg["steps"]:
            return
        if world > 1:
            dist.all_reduce(self.sums)
            self.sums /= world
        mean = (self.sums / self.count).tolist()                            # the only host sync
        if not all(map(math.isfinite, mean)):
            last = self.run.folder / "checkpoint.pt"
            raise FloatingPointError(f"non-finite loss between steps {step - self.count + 1} and {step}; stopping. "
                                     + (f"The last good checkpoint is {last}" if last.exists() else
                                        "No checkpoint was written yet") + " (try a lower --lr)")
        names = ["loss", *parts]
        self.sums, self.count = None, 0
        if world_info()[0] == 0:
            runtime.append_row(self.run.folder / "log.jsonl", dict(
                step=step, **dict(zip(names, mean)), lr=self.run.optimizer.param_groups[0]["lr"],
                seconds=round(time.time() - self.t0, 3)))
            self.bar.set_postfix({n.replace("loss_", ""): f"{v:.4f}" for n, v in zip(names, mean)})


def save_state(run, step):
    """Checkpointing: checkpoint.pt (everything --resume needs) and backbone.pt every
    --checkpoint-every steps and at the end."""
    if step % run.cfg["checkpoint_every"] == 0 or step == run.cfg["steps"]:
        save_checkpoint(run.folder / "checkpoint.pt", step, run.cfg, vars(run.args), run.model, run.optimizer)
        save_backbone(run.folder / "backbone.pt", run.model, run.cfg, step)


def main(args, build=build_model, step=training_step, after_step=None):
    """Pretrain: setup, train, and the run folder marked finished. A neighbouring method passes its
    own model builder, step and after-step update."""
    run = setup(args, build)
    last = train(run, step, after_step)
    if world_info()[0] == 0:
        runtime.finish_run(run.folder)
        print(f"done: {last} steps; backbone for linear_probe.py / finetune.py: {run.folder / 'backbone.pt'}")
    runtime.end_distributed()
    return run.folder


# ----------------------------------------------------------------------------- command line

def build_parser(add_method_arguments=None, description=None):
    """pretrain.py's flags; a neighbouring method replaces the paper's method flags by its own."""
    p = argparse.ArgumentParser(description=description or __doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    # Data and run folder
    p.add_argument("--data", required=True, help="preprocessed DATA_DIR (preprocess.py; a multi-channel corpus is read "
                                                 "as one volume per channel), or 'demo' (data/demo/unlabelled)")
    p.add_argument("--split", nargs="?", const=True, metavar="FILE",
                   help="pretrain on the 'train' cases of this split file only (without FILE: DATA/split.json): "
                        "the labelled-pool control of experiments/evidence.py (--data data/demo --split)")
    p.add_argument("--out", help="run folder [runs/pretrain, or runs/pretrain-demo for --data demo]")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    p.add_argument("--force", action="store_true", help="replace the run in --out (its files are removed first)")
    p.add_argument("--init-from", help="start from these backbone weights: our backbone.pt or the authors' "
                                       "released files (README, 'Use the authors' weights'); they set the FPN's size")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--workers", type=runtime.worker_count, default=min(4, max(1, (os.cpu_count() or 2) - 1)),
                   help="DataLoader processes reading memory-mapped patches")
    p.add_argument("--preset", choices=["paper", "demo"],
                   help="demo replaces some defaults with pretrain.DEMO [demo for --data demo, else paper]")
    # Network (model.ARCHS; the demo preset: model.DEMO_ARCHS)
    p.add_argument("--base-channels", type=positive_int, default=ARCHS["balanced"]["base_channels"], help="FPN width at full resolution")
    p.add_argument("--num-levels", type=positive_int, default=ARCHS["balanced"]["num_levels"], help="FPN levels")
    # The method (Table 1 ablations), or a neighbouring method's own flags
    (add_method_arguments or add_paper_arguments)(p)
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
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on a GPU, or on a CPU with bf16 instructions (avx512_bf16 / AMX) where a "
                        "probe finds its convolution gradients right; fp32 elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p


def add_paper_arguments(p):
    p.add_argument("--method", choices=["ours", "vox2vec"], default="ours",
                   help="ours (the paper), or the vox2vec baseline (VOX2VEC: its arch, augmentations, no L_r)")
    p.add_argument("--arch", choices=sorted(ARCHS), default="balanced", help="voxel representation (Sec. 2.2)")
    p.add_argument("--aug", choices=KINDS, default="local", help="augmentations (Sec. 2.1)")
    p.add_argument("--recon-weight", type=non_negative_float, default=10.0, help="lambda of Eq. 3; 0 = contrastive only")
    p.add_argument("--contrastive-weight", type=non_negative_float, default=1.0, help="weight of L_c; 0 = restorative only")
    p.add_argument("--temperature", type=positive_float, default=0.1, help="tau of Eq. 1")


def preset(args, demo=DEMO):
    """The values replacing the paper's defaults: --method vox2vec's, then the demo's network and DEMO."""
    values = dict(VOX2VEC) if getattr(args, "method", "ours") == "vox2vec" else {}
    arch = args.arch if "arch" in args.given else values.get("arch", "balanced")
    values.update((DEMO_ARCHS if runtime.is_demo(args) else ARCHS)[arch])
    return {**values, **(demo if runtime.is_demo(args) else {})}


# Settings a run cannot honour, refused where the flags are parsed.
RULES = [
    lambda a: a.num_voxels > math.prod(a.patch_size) and (
        f"--num-voxels {a.num_voxels} is more than a {'x'.join(map(str, a.patch_size))} patch holds "
        f"({math.prod(a.patch_size)} voxels)"),
    lambda a: a.batch_pairs % a.pairs_per_volume and f"--batch-pairs {a.batch_pairs} must be a multiple of --pairs-per-volume",
    lambda a: a.warmup_steps >= a.steps and (f"--warmup-steps {a.warmup_steps} is not shorter than --steps {a.steps}: "
                                             f"the lr would never reach --lr; give fewer than {a.steps}"),
    lambda a: a.resume and a.force and "--resume continues the run in --out, --force replaces it: give one",
    lambda a: a.resume and a.init_from and "--init-from has no effect with --resume (the checkpoint holds the weights)",
]
PAPER_RULES = [lambda a: a.recon_weight == 0 and a.contrastive_weight == 0 and (
    "--recon-weight and --contrastive-weight are both 0: nothing to train")]


def parse_args(argv=None):
    return runtime.parse(build_parser(), argv, preset, RULES + PAPER_RULES)


if __name__ == "__main__":
    runtime.cli(main, parse_args, interrupted="interrupted; the last checkpoint is kept: the same command with "
                                              "--resume continues")
