"""Fine-tuning a pretrained FPN for segmentation (or training it from scratch).

Kats et al. 2024, Sec. 3.2 (Table 3): a non-linear head on the FPN (model.NonLinearHead; the
paper gives none); the backbone frozen for the first 15,000 steps, then its learning rate ramping
exponentially from 3e-5 to 3e-4 over 1,200 steps; 45,000 steps, batch 7, Adam 3e-4. `--init
random` trains the same network from scratch (nothing frozen), Table 3's baseline. Folds, label
budgets and evaluation are downstream.py's, shared with linear_probe.py.

    python finetune.py --data demo --split --train-cases 1 --checkpoint runs/pretrain-demo \
        --out runs/ft
    python finetune.py --data demo --split --train-cases 1 --init random --out runs/scratch
    python finetune.py --data DATA_DIR --checkpoint backbone.pt --out DIR        # the paper's
    python finetune.py --data DATA_DIR --checkpoint backbone.pt --out DIR --resume  # go on

Deviation (default `--aug nnunet-like`): every training patch is augmented as nnU-Net does
(supervised_augment.py), where the paper trains without (`--aug none`): with one or two labelled
scans a network otherwise learns their intensity scale. Both arms of a comparison get the same
setting. On data whose classes are sided (left / right kidney), leave the left-right axis (0)
out of --mirror-axes: a mirrored patch shows the left kidney labelled as the right one.
`--preset demo` (the default for --data demo) takes DEMO (DEMO_SCRATCH for --init random): the
recipes the evidence chose for each arm on the validation cases. Each fold writes
DIR/model_fold<k>.pt as it finishes (the network, what predict.py needs, its Dice per test case);
results.json, written last, finishes the run; `--resume` keeps a killed run's finished folds.
A variant of the training step (experiments/neighbours/) passes `hooks` to main.
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import downstream
import runtime
from data import LabelledPatchDataset, read_dataset, step_loader
from downstream import announce, batchnorms, evaluate, fold_mean, new_segmenter, no_effect, prepare
from downstream import set_backbone_trainable
from loss import segmentation_loss
from model import training_bytes
from runtime import axis, non_negative_int, positive_float, positive_int, world_info
from supervised_augment import SUPERVISED_KINDS, supervised_augment
from weights import load_segmenter, save_segmenter

# The demo (demo.DEMO_SCALE volumes, model.DEMO_ARCHS network): 450 steps of two 32 x 32 x 16
# patches at Adam 2e-3 (the paper's 3e-4 is tuned for 45,000 steps). The schedules are what the
# evidence's recipe grid chose on the validation cases (docs/results.md): for a pretrained
# backbone the paper's freeze-then-ramp (150 steps frozen with BatchNorm training, a 40-step ramp
# from 2e-4), from scratch plain training. No augmentation (docs/augmentation.md).
DEMO = dict(steps=450, batch_size=2, patch_size=(32, 32, 16), eval_patch_size=(96, 96, 48), lr=2e-3,
            freeze_steps=150, ramp_steps=40, ramp_start_lr=2e-4, frozen_bn="train", warmup_steps=0,
            aug="none", mirror_axes=())
DEMO_SCRATCH = dict(DEMO, freeze_steps=0, ramp_steps=0)
CONFIG = ("steps", "batch_size", "patch_size", "eval_patch_size", "lr", "folds", "freeze_steps",
          "ramp_steps", "ramp_start_lr", "backbone_lr_scale", "warmup_steps", "frozen_bn", "aug",
          "mirror_axes", "bn_batches")


# ------------------------------------------------------------------------- the schedule of Sec. 3.2

def backbone_lr(step, cfg):
    """Sec. 3.2: 0 while frozen, then exponential from ramp_start_lr to lr over ramp_steps; both
    times --backbone-lr-scale (1: the paper; nnssl gives pretrained weights a 10x lower lr)."""
    t, scale = step - cfg["freeze_steps"], cfg["backbone_lr_scale"]
    if t < 0:
        return 0.0
    if t >= cfg["ramp_steps"]:
        return cfg["lr"] * scale
    growth = (cfg["lr"] / cfg["ramp_start_lr"]) ** (t / cfg["ramp_steps"])
    return scale * cfg["ramp_start_lr"] * growth


def apply_schedule(step, model, optimizer, cfg):
    """This step's learning rates. At backbone lr 0 the backbone is frozen for real (no gradients,
    BatchNorm in eval mode), except with --frozen-bn train (Lightning's train_bn, the authors'
    setting): then its BatchNorm layers keep training, at the head's lr, with batch statistics."""
    lr, factor = backbone_lr(step, cfg), runtime.warmup(step, cfg["warmup_steps"])   # nnssl's
    bn_trains = cfg["frozen_bn"] == "train"
    if any(p.requires_grad for p in backbone_weights(model, bn=False)) != (lr > 0):
        set_backbone_trainable(model, lr > 0, keep_batchnorm=bn_trains)
    bn = cfg["lr"] if lr == 0 and bn_trains else lr
    rates = dict(head=cfg["lr"], backbone=lr, backbone_bn=bn)
    for group in optimizer.param_groups:
        group["lr"] = factor * rates[group["name"]]


def backbone_weights(model, bn):
    """The backbone's BatchNorm parameters (bn=True) or all its others."""
    norms = {id(p) for m in batchnorms(model.backbone) for p in m.parameters()}
    return [p for p in model.backbone.parameters() if (id(p) in norms) == bn]


def make_optimizer(model, lr):
    """Adam over the head, the backbone and the backbone's BatchNorm parameters, each its own
    group so the schedule can freeze or scale them."""
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [dict(params=head, lr=lr, name="head"),
              dict(params=backbone_weights(model, bn=False), lr=lr, name="backbone"),
              dict(params=backbone_weights(model, bn=True), lr=lr, name="backbone_bn")]
    return torch.optim.Adam(groups, lr=lr)


# ----------------------------------------------------------------------------- the training loop

def segmentation_step(net, x, y, amp_dtype=None):
    """One step's forward and loss: x (b, C, X, Y, Z), y (b, X, Y, Z) -> softmax CE + soft Dice."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = net(x)                                        # (b, K, X, Y, Z)
    return segmentation_loss(logits.float(), y)


def make_loader(data_dir, train_ids, cfg, seed, workers):
    """--batch-size is the global batch: rank r of W reads its b = batch / W items of every step."""
    rank, world = world_info()
    dataset = LabelledPatchDataset(data_dir, train_ids, patch_size=cfg["patch_size"],
                                   length=cfg["steps"] * cfg["batch_size"], seed=seed)
    return step_loader(dataset, cfg["steps"], cfg["batch_size"] // world, rank, world,
                       workers=workers)


def train_segmenter(model, loader, cfg, seed, device, amp_dtype, net=None, step=segmentation_step,
                    after_step=None,
                    on_step=None, desc="train"):
    """The loop: schedule -> augment -> step (forward + loss) -> backward -> optimizer. DDP is
    re-wrapped when the schedule changes which parameters train (DDP fixes that set when it is
    built). Every patch draws its augmentation from one seeded stream on the device (per rank).
    A variant passes what DDP wraps (net), its step, an after-step update; on_step(step, model)
    is called after every step (the lab records a curve with it)."""
    rank, world = world_info()
    optimizer = make_optimizer(model, cfg["lr"])
    runtime.prepare_training(device)
    aug_generator = torch.Generator(device=device).manual_seed(seed * 7919 + 29 + rank)
    net, wrapped, trains, losses = net or model, None, None, torch.zeros((), device=device)
    bar = tqdm(loader, total=cfg["steps"], desc=desc, dynamic_ncols=True, leave=False,
               disable=rank != 0)
    for s, batch in enumerate(bar):
        apply_schedule(s, model, optimizer, cfg)
        trains_now = tuple(p.requires_grad for p in model.parameters())
        if wrapped is None or (world > 1 and trains_now != trains):
            trains, wrapped = trains_now, runtime.wrap_ddp(net, device) if world > 1 else net
        x = batch["image"].to(device, non_blocking=True)   # (b, C, X, Y, Z)
        y = batch["label"].to(device, non_blocking=True)   # (b, X, Y, Z)
        x, y = supervised_augment(x, y, aug_generator, cfg["aug"], cfg["mirror_axes"])
        loss = step(wrapped, x.contiguous(memory_format=torch.channels_last_3d), y, amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(model)
        losses += loss.detach()
        if (s + 1) % 25 == 0 or s + 1 == cfg["steps"]:     # one host read: the mean loss since
            mean, first = losses.item() / (s % 25 + 1), s - s % 25 + 1
            if not math.isfinite(mean):
                raise runtime.Diverged(f"{desc}: non-finite loss between steps {first} and "
                                       f"{s + 1}; stopping, nothing of this fold is saved (try a "
                                       "lower --lr)")
            bar.set_postfix(loss=f"{mean:.3f}")
            losses.zero_()
        if on_step is not None:
            on_step(s + 1, model)


@torch.no_grad()
def reestimate_batchnorm(model, data_dir, train_ids, cfg, device, seed):
    """Replace every BatchNorm's running statistics by their plain average over cfg["bn_batches"]
    batches of (un-augmented) training patches, the weights fixed ("precise BN", Wu & Johnson
    2021): the running statistics are an exponential average over the last few small batches,
    taken while the weights still moved."""
    norms = batchnorms(model)
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                     # cumulative average instead of an exponential one
    dataset = LabelledPatchDataset(data_dir, train_ids, patch_size=cfg["patch_size"],
                                   length=cfg["bn_batches"] * cfg["batch_size"], seed=seed)
    model.train()
    for b in range(cfg["bn_batches"] if norms else 0):
        items = [dataset[b * cfg["batch_size"] + j] for j in range(cfg["batch_size"])]
        x = torch.stack([it["image"] for it in items]).to(device)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        model(x)                              # (b, C, X, Y, Z): only the statistics change
    for m in norms:
        m.momentum = 0.1
    return model.train(was_training)


# ----------------------------------------------------------------------------- main

def main(args, hooks=None, outputs=()):
    """Every fold: a fresh segmenter, trained, its BatchNorm statistics re-estimated, evaluated
    and saved; then results.json. hooks(model, cfg, args, run, fold) -> keyword arguments of
    train_segmenter (a variant's net, step and after_step; the lab's on_step); outputs: the
    names of other files the run writes into --out (the lab's)."""
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in CONFIG}
    run = prepare(args, batch_size=cfg["batch_size"])
    models = [f"model_fold{fold}.pt" for fold, _, _ in run.plan]
    kept = runtime.claim_run(args.out, "finetune.py", ["results.json", *models, *outputs],
                             runtime.settings(args),
                             run.inputs, args.force, args.resume) if run.rank == 0 else None
    if run.world > 1:           # every process skips the folds a killed run finished
        kept = runtime.broadcast(kept)
    amp_dtype = runtime.amp_dtype(run.device, args.amp)
    announce("fine-tune", args, cfg, run.device, amp_dtype)
    fold_dice, cases, started, out = {}, {}, time.time(), Path(args.out)
    for fold, train_ids, test_ids in run.plan:
        cases[fold] = (train_ids, test_ids)
        path = out / f"model_fold{fold}.pt"
        model, info = new_segmenter(args, run.backbone, len(run.names), "nonlinear", run.device,
                                    fold, run.channels)
        if path.name in kept:      # a fold a killed run finished: kept
            fold_dice[fold] = np.array(load_segmenter(path)[1]["test_dice"], dtype=np.float64)
            print(f"fold {fold}: kept from the earlier run ({path})")
            continue
        per_rank, size = cfg["batch_size"] // run.world, "x".join(map(str, cfg["patch_size"]))
        runtime.check_memory(training_bytes(model.backbone.channels, cfg["patch_size"], per_rank),
                             run.device, f"a step of {per_rank} {size} patches")
        loader = make_loader(run.data_dir, train_ids, cfg, args.seed, args.workers)
        amp = runtime.amp_dtype(run.device, args.amp, model.backbone.channels, cfg["patch_size"])
        train_segmenter(model, loader, cfg, args.seed, run.device, amp, desc=f"fold {fold}",
                        **(hooks(model, cfg, args, run, fold) if hooks else {}))
        reestimate_batchnorm(model, run.data_dir, train_ids, cfg, run.device,
                             seed=args.seed + 1000 + fold)
        if run.rank == 0:       # under torchrun, rank 0 alone evaluates and writes; the others wait
            fold_dice[fold] = evaluate(model, run.test_dir, test_ids, len(run.names),
                                       cfg["eval_patch_size"], run.device, amp_dtype)
            meta = read_dataset(run.data_dir)[1]
            mirrored = list(cfg["mirror_axes"]) if cfg["aug"] != "none" else []
            save_segmenter(path, model, labels={str(k): v for k, v in run.names.items()},
                           modality=meta["modality"], preset=meta["preset"],
                           channels=run.preprocessing["channels"], aug=cfg["aug"],
                           patch_size=list(cfg["eval_patch_size"]), mirror_axes=mirrored,
                           fold=fold, train_cases=list(train_ids), test_cases=list(test_ids),
                           test_dice=fold_dice[fold].tolist())
            print(f"fold {fold}: {len(train_ids)} train / {len(test_ids)} test cases, "
                  f"mean Dice {fold_mean(fold_dice[fold]):.3f}")
        if run.world > 1:
            torch.distributed.barrier()
    if run.world > 1:
        runtime.end_distributed()
    if run.rank != 0:
        return None
    return downstream.write_results(args, cfg, fold_dice, run.names, info, cases, started,
                                    "fine-tune")


# ----------------------------------------------------------------------------- command line

def build_parser(description=None):
    p = argparse.ArgumentParser(description=description or __doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    downstream.add_common_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out: keep its finished folds")
    # Optimisation and the schedule of Sec. 3.2
    p.add_argument("--steps", type=positive_int, default=45_000)
    p.add_argument("--batch-size", type=positive_int, default=7,
                   help="global over torchrun processes")
    p.add_argument("--patch-size", type=positive_int, nargs=3, default=(128, 128, 32),
                   help="training patch (X, Y, Z)")
    p.add_argument("--lr", type=positive_float, default=3e-4, help="Adam learning rate")
    p.add_argument("--freeze-steps", type=non_negative_int, default=15_000,
                   help="backbone frozen this long")
    p.add_argument("--ramp-steps", type=non_negative_int, default=1_200,
                   help="exponential backbone-lr ramp")
    p.add_argument("--ramp-start-lr", type=positive_float, default=3e-5)
    p.add_argument("--backbone-lr-scale", type=positive_float, default=1.0,
                   help="the backbone's lr is this times --lr (and its ramp with it)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0,
                   help="every lr grows linearly over these first steps (nnssl's warm-up; 0: none)")
    p.add_argument("--frozen-bn", choices=["eval", "train"], default="eval",
                   help="a frozen backbone's BatchNorm: fixed statistics and weights (eval), or "
                        "trained at the head's lr on batch statistics (train: the authors' "
                        "Lightning default)")
    p.add_argument("--aug", choices=SUPERVISED_KINDS, default="nnunet-like",
                   help="augmentation of every training patch (supervised_augment.py): nnU-Net's "
                        "spatial + intensity defaults; 'none' is the paper's protocol. Applies to "
                        "--init random too")
    p.add_argument("--mirror-axes", type=axis, nargs="*", default=(0, 1, 2),
                   help="axes --aug nnunet-like may mirror (nnU-Net's allowed mirroring axes; "
                        "none: no mirroring); leave 0 (X, left-right) out when classes are sided. "
                        "predict.py mirrors the same axes")
    p.add_argument("--workers", type=runtime.worker_count, default=1, help="DataLoader processes")
    p.add_argument("--bn-batches", type=positive_int, default=100,
                   help="training batches BatchNorm statistics are re-estimated over, per fold")
    return p


def preset(args):
    """The demo's values (DEMO, or DEMO_SCRATCH for --init random) and the demo's network; from
    scratch the whole network trains at --lr from step 0 (nothing is frozen)."""
    scratch = dict(freeze_steps=0, ramp_steps=0) if args.init == "random" else {}
    return {**downstream.preset(args, DEMO_SCRATCH if args.init == "random" else DEMO), **scratch}


FROZEN_ONLY = ("freeze_steps", "ramp_steps", "ramp_start_lr", "frozen_bn")   # of a frozen backbone


def refusals(a):
    """Settings fine-tuning cannot honour, refused where the flags are parsed."""
    yield from downstream.refusals(a)
    if a.resume and a.force:
        yield "--resume continues the run in --out, --force replaces it: give one"
    if a.warmup_steps >= a.steps:
        yield (f"--warmup-steps {a.warmup_steps} is not shorter than --steps {a.steps}: the lr "
               f"would never reach --lr; give fewer than {a.steps}")
    for flag in FROZEN_ONLY:
        yield no_effect(a, flag, a.init == "random", "with --init random nothing is frozen")
    yield no_effect(a, "frozen_bn", a.freeze_steps == 0, "with --freeze-steps 0 nothing is frozen")
    yield no_effect(a, "ramp_start_lr", a.ramp_steps == 0, "with --ramp-steps 0 there is no ramp")
    yield no_effect(a, "mirror_axes", a.aug == "none", "with --aug none nothing is mirrored")
    if len(set(a.mirror_axes)) < len(a.mirror_axes):
        yield f"--mirror-axes {' '.join(map(str, a.mirror_axes))}: an axis given twice"
    if a.init != "random" and a.freeze_steps + a.ramp_steps > a.steps:
        yield (f"--freeze-steps {a.freeze_steps} + --ramp-steps {a.ramp_steps} run past --steps "
               f"{a.steps}: the backbone would "
               f"{'never train' if a.freeze_steps >= a.steps else 'never reach --lr'}; give a "
               "shorter freeze or ramp")


def parse_args(argv=None):
    return runtime.parse(build_parser(), argv, preset, refusals)


if __name__ == "__main__":
    runtime.cli(main, parse_args, interrupted="interrupted; finished folds are kept: the same "
                                              "command with --resume continues")
