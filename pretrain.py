"""Self-supervised pretraining of a 3D FPN with dense, hierarchically balanced voxel embeddings
(Kats, Hirsch & Heinrich 2024, Sec. 2, Fig. 2; built on vox2vec, Goncharov et al. 2023).

    python pretrain.py --data demo                        # the demo preset and corpus (CPU)
    python pretrain.py --data DATA_DIR --out runs/ct      # the paper's config (one GPU)
    python pretrain.py --data DATA_DIR --method vox2vec   # the vox2vec baseline (Table 1, row 1)
    python pretrain.py --data DATA_DIR --out runs/ct --resume     # continue an interrupted run
    torchrun --nproc_per_node=4 pretrain.py --data DATA_DIR       # several GPUs (DDP)

Read it top to bottom: the method (build_model, training_step, learning_rate), then one run
(main: setup, then train, the loop with its logging and checkpointing), then the command line.
One step: two overlapping crops of a scan (Sec. 2.1), each augmented by its own t ~ T, one FPN
forward for both, balanced voxel representations at n positive pairs (Sec. 2.2), and
L = L_c + lambda L_r (Eq. 1-3, tau = 0.1, lambda = 10). The paper's values are the flags'
defaults; `--preset demo` (the default for `--data demo`) replaces some with DEMO. A run writes
log.jsonl, checkpoint.pt (resumable) and backbone.pt (the FPN alone, with how its corpus was
preprocessed) into --out. Table 1's ablations are flags; a neighbouring method
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
from data import PairDataset, collate_pairs, list_cases, preprocessing, read_dataset, read_split
from data import step_loader
from loss import hybrid_loss, info_nce, reconstruction_loss
from model import ARCHS, DEMO_ARCHS, PretrainModel, training_bytes
from runtime import non_negative_float, non_negative_int, positive_float, positive_int
from weights import check_backbone_flags, load_checkpoint, read_backbone, save_backbone
from weights import save_checkpoint

# The demo preset (demo.DEMO_SCALE volumes of ~52 x 45 x 20 voxels, model.DEMO_ARCHS network).
# The patch sets how far the two views of a pair move against each other relative to the patch:
# 24 x 24 x 8 on a demo volume moves them as much as the paper's patch on an abdominal CT
# (`python experiments/diagnostics.py --geometry`). Steps, lr, schedule and batch: the cell the
# recipe grid chose on the validation cases (docs/results.md).
DEMO = dict(steps=1260, batch_pairs=8, num_voxels=128, patch_size=(24, 24, 8), lr=3e-4,
            warmup_steps=0, lr_schedule="constant", log_every=10, checkpoint_every=100,
            out="runs/pretrain-demo")
VOX2VEC = dict(arch="vox2vec", aug="vox2vec", recon_weight=0.0)   # --method vox2vec: the baseline
OUTPUTS = ("log.jsonl", "checkpoint.pt", "backbone.pt")           # what a run writes into --out
MAY_CHANGE = ("steps", "log_every", "checkpoint_every")          # on a --resume
WORKERS = min(4, max(1, (os.cpu_count() or 2) - 1))      # processes, a core left to the training


# ----------------------------------------------------------------------------- the method (Sec. 2)

def build_model(cfg, backbone_state=None):
    """The network of Fig. 2 (model.PretrainModel), its FPN loaded from --init-from's weights."""
    backbone = dict(in_channels=1, base_channels=cfg["base_channels"], num_levels=cfg["num_levels"])
    model = PretrainModel(backbone, arch=cfg["arch"])
    if backbone_state is not None:
        model.backbone.load_state_dict(backbone_state)
    return model


def training_step(model, batch, cfg, generator, device, amp_dtype):
    """One forward of both augmented views; L_c (Eq. 1), L_r (Eq. 2), L (Eq. 3) -> (L, its parts).
    No host-device synchronisation happens in here."""
    B, N = batch["patches_a"].shape[0], batch["coords_a"].shape[0]
    xa = batch["patches_a"].to(device, non_blocking=True)  # (B, 1, X, Y, Z) un-augmented: Eq. 2's
    xb = batch["patches_b"].to(device, non_blocking=True)  # target
    # View B's patches follow view A's in the stacked batch: its pair index shifted, on the host.
    coords = torch.cat([batch["coords_a"], batch["coords_b"] + torch.tensor([B, 0, 0, 0])])
    coords = coords.to(device, non_blocking=True)                       # (2N, 4)
    x = torch.cat([augment_batch(xa, generator, cfg["aug"]),
                   augment_batch(xb, generator, cfg["aug"])])          # (2B, 1, X, Y, Z)
    x = x.contiguous(memory_format=torch.channels_last_3d)   # faster 3D convs on GPU and CPU alike
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        z, recon = model(x, coords)                        # (2N, 128), (2B, 1, X, Y, Z)
    za, zb, valid = z[:N], z[N:], None
    if dist.is_initialized():     # torchrun: InfoNCE's negatives from every process
        za, zb, valid = runtime.gather_embeddings(za, zb, cfg["num_voxels"] * B)
    l_c = info_nce(za, zb, cfg["temperature"], valid)                    # Eq. 1
    l_r = reconstruction_loss(recon[:B], xa, recon[B:], xb)              # Eq. 2
    loss = hybrid_loss(l_c, l_r, cfg["recon_weight"], cfg["contrastive_weight"])   # Eq. 3
    return loss, dict(loss_contrastive=l_c, loss_recon=l_r)


def learning_rate(step, cfg):
    """The lr of step `step` (0-based): runtime.warmup's linear warm-up over --warmup-steps, then
    constant (the paper's) or, with --lr-schedule cosine, a half cosine to 0 at --steps."""
    lr, warm = cfg["lr"] * runtime.warmup(step, cfg["warmup_steps"]), cfg["warmup_steps"]
    if cfg["lr_schedule"] == "cosine" and step >= warm:
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg["steps"] - warm)))
    return lr


# ----------------------------------------------------------------------------- one run

def main(args, build=build_model, step=training_step, after_step=None):
    """Pretrain: setup, train, the run folder marked finished. A neighbouring method passes its
    own model builder, step and after-step update."""
    run = setup(args, build)
    last = train(run, step, after_step)
    if run.rank == 0:
        runtime.finish_run(run.folder)
        print(f"done: {last} steps; the backbone: {run.folder / 'backbone.pt'}")
    if run.world > 1:
        runtime.end_distributed()
    return run.folder


def setup(args, build=build_model, outputs=OUTPUTS):
    """Everything before the first step, every input problem one line before any work -> the
    run: namespace(cfg, model, optimizer, loader, folder, start, device, amp_dtype, rank, world)."""
    device, rank, world = runtime.pick_device(args.device), 0, 1
    if "RANK" in os.environ:                                    # launched by torchrun
        rank, world, device = runtime.setup_distributed(device)
    per_rank = runtime.split_batch(args.batch_pairs, world, args.pairs_per_volume, "--batch-pairs")
    items = per_rank // args.pairs_per_volume                  # dataset items per process and step
    data_dir, info = read_dataset(args.data, demo_part="unlabelled")
    split = data_dir / "split.json" if args.split is True else args.split
    cases = read_split(split, list_cases(info, labelled=True))["train"] if args.split else None
    dataset = PairDataset(data_dir, args.patch_size, args.num_voxels, args.pairs_per_volume,
                          length=args.steps * world * items, seed=args.seed, case_ids=cases)
    cfg = dict(runtime.settings(args), data=str(data_dir.resolve()), cases=cases,
               preprocessing=preprocessing(info))         # backbone.pt keeps how its data was made
    init = None
    if args.init_from:      # ours or the authors' released weights: the file decides the FPN's size
        config, init, _ = read_backbone(args.init_from)
        check_backbone_flags(args, config, args.init_from)
        cfg.update(base_channels=config["base_channels"], num_levels=config["num_levels"])
    torch.manual_seed(args.seed)
    model = build(cfg, init)
    needed = training_bytes(model.backbone.channels, args.patch_size, 2 * per_rank,
                            args.batch_pairs * args.num_voxels)
    size = "x".join(map(str, args.patch_size))
    runtime.check_memory(needed, device, f"a step of {per_rank} pairs of {size} patches")
    folder = Path(args.out)
    if rank == 0:   # one run per folder, claimed before anything in it is read or written
        may_change = [k for k in MAY_CHANGE if k != "steps" or args.lr_schedule == "constant"]
        runtime.claim_run(folder, "pretrain.py", outputs, cfg, dataset.inputs, args.force,
                          args.resume, may_change)
    model = model.to(device, memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    start = load_checkpoint(folder / "checkpoint.pt", model, optimizer) if args.resume else 0
    if rank == 0 and start:
        runtime.truncate_log(folder / "log.jsonl", start)   # the rows after it are logged again
    loader = step_loader(dataset, args.steps, items, rank, world, start, args.workers,
                         collate_pairs)
    amp_dtype = runtime.amp_dtype(device, args.amp, model.backbone.channels, args.patch_size)
    if rank == 0:
        print(f"pretrain: {world} process(es) on {device} ({'bf16' if amp_dtype else 'fp32'}), run "
              f"dir {folder}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"from step {start}\nconfig: {json.dumps(cfg)}")
    return SimpleNamespace(cfg=cfg, model=model, optimizer=optimizer, loader=loader, folder=folder,
                           start=start, device=device, amp_dtype=amp_dtype, rank=rank, world=world,
                           compile=args.compile)


def train(run, step=training_step, after_step=None):
    """nanoGPT's loop: batch -> step (augment, forward, loss) -> backward -> clip -> lr ->
    optimizer -> log -> checkpoint. The host reads the device every --log-every steps only."""
    cfg, model, optimizer, device = run.cfg, run.model, run.optimizer, run.device
    runtime.prepare_training(device)
    net = runtime.wrap_ddp(model, device) if run.world > 1 else model
    net = torch.compile(net) if run.compile else net
    generator = torch.Generator(device=device)
    sums, count, t0 = 0, 0, time.time()     # the losses summed on the device since the last row
    bar = tqdm(total=cfg["steps"], initial=run.start, disable=run.rank != 0, dynamic_ncols=True)
    model.train()
    for s, batch in enumerate(run.loader, start=run.start):
        # Augmentations are a fixed function of (seed, step, rank): resuming reproduces them.
        generator.manual_seed((cfg["seed"] * 1_000_003 + s) * 64 + run.rank)
        loss, parts = step(net, batch, cfg, generator, device, run.amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(s, cfg)
        optimizer.step()
        if after_step is not None:
            after_step(model, cfg, s + 1)
        bar.update()
        # Logging: every --log-every steps and at every checkpoint, one host read.
        sums, count, done = sums + torch.stack([loss, *parts.values()]).detach(), count + 1, s + 1
        checkpoint = done % cfg["checkpoint_every"] == 0 or done == cfg["steps"]
        if done % cfg["log_every"] and not checkpoint:
            continue
        if run.world > 1:
            dist.all_reduce(sums)
            sums /= run.world
        mean = (sums.float() / count).tolist()                     # the only host sync
        if not all(map(math.isfinite, mean)):
            last = run.folder / "checkpoint.pt"
            kept = f"The last good checkpoint is {last}" if last.exists() else "No checkpoint yet"
            bar.close()                                 # so that the one line is the last one
            raise runtime.Diverged(f"non-finite loss between steps {done - count + 1} and {done}; "
                                   f"stopping. {kept} (try a lower --lr)")
        row = dict(step=done, **dict(zip(["loss", *parts], mean)),
                   lr=optimizer.param_groups[0]["lr"], seconds=round(time.time() - t0, 3))
        sums, count = 0, 0
        if run.rank == 0:
            runtime.append_row(run.folder / "log.jsonl", row)
            losses = {k.replace("loss_", ""): f"{v:.4f}" for k, v in row.items() if "loss" in k}
            bar.set_postfix(losses)
        # Checkpointing: everything --resume needs, and the FPN alone for the downstream stages.
        if checkpoint and run.rank == 0:
            save_checkpoint(run.folder / "checkpoint.pt", done, cfg, model, optimizer)
            save_backbone(run.folder / "backbone.pt", model, cfg, done)
    bar.close()
    return run.start + len(run.loader)


# ----------------------------------------------------------------------------- command line

def build_parser(add_method_arguments=None, description=None):
    """pretrain.py's flags; a neighbouring method adds its own instead of the paper's method's."""
    p = argparse.ArgumentParser(description=description or __doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    # Data and run folder
    p.add_argument("--data", required=True, help="preprocessed DATA_DIR, or demo (its corpus)")
    p.add_argument("--split", nargs="?", const=True, help="only a split's 'train' cases [DATA's]")
    p.add_argument("--out", default="runs/pretrain", help="run folder (demo: runs/pretrain-demo)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="replace the run in --out")
    p.add_argument("--init-from", help="start from these weights (our backbone.pt or the authors')")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--workers", type=runtime.worker_count, default=WORKERS, help="DataLoader's")
    p.add_argument("--preset", choices=["paper", "demo"], help="demo: DEMO [for --data demo]")
    # Network (model.ARCHS; the demo preset: model.DEMO_ARCHS)
    p.add_argument("--base-channels", type=positive_int, default=32, help="FPN width, level 0")
    p.add_argument("--num-levels", type=positive_int, default=5, help="FPN levels")
    # The method: Table 1's ablations, or a neighbouring method's own flags
    if add_method_arguments is not None:
        add_method_arguments(p)
    else:
        p.add_argument("--method", choices=["ours", "vox2vec"], default="ours", help="or VOX2VEC")
        p.add_argument("--arch", choices=sorted(ARCHS), default="balanced", help="Sec. 2.2")
        p.add_argument("--aug", choices=KINDS, default="local", help="augmentations (Sec. 2.1)")
        p.add_argument("--recon-weight", type=non_negative_float, default=10.0, help="Eq. 3's")
        p.add_argument("--contrastive-weight", type=non_negative_float, default=1.0, help="of L_c")
        p.add_argument("--temperature", type=positive_float, default=0.1, help="tau of Eq. 1")
    # Optimisation (Sec. 3.2)
    p.add_argument("--steps", type=positive_int, default=50_000)
    p.add_argument("--batch-pairs", type=positive_int, default=10, help="pairs per step, globally")
    p.add_argument("--pairs-per-volume", type=positive_int, default=1, help="pairs of one scan")
    p.add_argument("--num-voxels", type=positive_int, default=1024, help="voxel pairs per pair")
    p.add_argument("--patch-size", type=positive_int, nargs=3, default=(128, 128, 32))
    p.add_argument("--lr", type=non_negative_float, default=3e-4, help="Adam's (a schedule's peak)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear lr warm-up")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--grad-clip", type=positive_float, default=1.0, help="the reference's")
    # Logging, checkpoints and speed
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between host syncs")
    p.add_argument("--checkpoint-every", type=positive_int, default=1000)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on a GPU, or on a CPU with bf16 instructions if right there")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p


def preset(args, demo=DEMO):
    """The values replacing the paper's defaults: --method vox2vec's, then the demo's network
    and DEMO (a neighbouring method passes its own)."""
    values = dict(VOX2VEC) if getattr(args, "method", "ours") == "vox2vec" else {}
    arch = args.arch if "arch" in args.given else values.get("arch", "balanced")
    values.update((DEMO_ARCHS if runtime.is_demo(args) else ARCHS)[arch])
    return {**values, **(demo if runtime.is_demo(args) else {})}


def refusals(a):
    """Settings a run cannot honour, refused where the flags are parsed."""
    if a.num_voxels > math.prod(a.patch_size):
        yield (f"--num-voxels {a.num_voxels} is more than a {'x'.join(map(str, a.patch_size))} "
               f"patch holds ({math.prod(a.patch_size)} voxels)")
    if a.warmup_steps >= a.steps:
        yield (f"--warmup-steps {a.warmup_steps} is not shorter than --steps {a.steps}: the lr "
               f"would never reach --lr; give fewer than {a.steps}")
    if a.resume and a.force:
        yield "--resume continues the run in --out, --force replaces it: give one"
    if a.resume and a.init_from:
        yield "--init-from has no effect with --resume (the checkpoint holds the weights)"
    if getattr(a, "recon_weight", 1) == 0 and getattr(a, "contrastive_weight", 1) == 0:
        yield "--recon-weight and --contrastive-weight are both 0: nothing to train"


def parse_args(argv=None):
    return runtime.parse(build_parser(), argv, preset, refusals)


if __name__ == "__main__":
    runtime.cli(main, parse_args, interrupted="interrupted; the last checkpoint is kept: the same "
                                              "command with --resume continues")
