"""Fine-tuning a pretrained FPN for segmentation (or training it from scratch).

Implements the fine-tuning protocol of Kats et al. 2024, Sec. 3.2 (Table 3): a non-linear head
on the FPN (model.NonLinearHead; the paper does not specify it, ours is described in model.py);
the backbone is frozen for the first 15,000 steps, then its learning rate ramps exponentially
from 3e-5 to 3e-4 over 1,200 steps; 45,000 steps, batch 7, Adam 3e-4. `--init random` trains
the same network from scratch (no freezing, backbone at 3e-4 from step 0), the baseline of
Table 3. Evaluation, folds and label budgets are downstream.py's, shared with linear_probe.py.

Deviation (default `--aug nnunet-like`): every training patch is augmented as nnU-Net does
(supervised_augment.py: rotation, scaling, noise, blur, brightness, contrast, gamma, mirroring
along --mirror-axes). The paper and vox2vec train downstream without augmentation (`--aug
none`); with one or two labelled scans a network then learns their intensity scale and fails on
other scanners. Both arms of a comparison (--checkpoint and --init random) get the same setting.
On data whose classes are sided (left / right kidney), leave the left-right axis (0, X in RAS
order) out of --mirror-axes: a mirrored patch shows the left kidney labelled as the right one.

Run it:
    python finetune.py --data demo --split --train-cases 1 --checkpoint runs/pretrain-demo --out runs/ft
    python finetune.py --data demo --split --train-cases 1 --init random --out runs/scratch
    python finetune.py --data DATA_DIR --checkpoint backbone.pt --out DIR            # the paper's schedule

The paper's values are the flags' defaults (`--help`); `--preset demo` (the default for --data
demo) replaces some with DEMO (and DEMO_SCRATCH for --init random): the recipes the evidence
chose for each arm on the validation cases, and no augmentation (docs/augmentation.md). Training
writes DIR/results.json (as linear_probe.py) and DIR/model_fold<k>.pt, the fine-tuned network
with everything prediction needs (its constructor arguments, class names, preprocessing preset,
training augmentation and mirror axes): `python predict.py -i SCANS -o OUT --model DIR`. A
variant of the training step (a file of its own under experiments/neighbours/) brings its own
Training class and calls main().
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import LabelledPatchDataset, load_dataset_json
from downstream import (add_common_args, announce, evaluate, fold_mean, new_segmenter, prepare, presets,
                        set_backbone_trainable, write_results)
from loss import segmentation_loss
from predict import load_model
from runtime import (CHECKPOINT_VERSION, autocast_dtype, axis, non_negative_int, parse_with_presets, positive_float,
                     positive_int, prepare_training, release_folder, save_torch, training_autocast_dtype, world_info,
                     wrap_ddp)
from supervised_augment import SUPERVISED_KINDS, supervised_augment

# The demo (demo.DEMO_SCALE volumes, model.DEMO_ARCHS network): 450 steps of two 32 x 32 x 16
# patches at Adam 2e-3 (the paper's 3e-4 is tuned for 45,000 steps). The schedules are what the
# evidence's recipe grid chose on the validation cases (experiments/evidence.py, docs/results.md):
# for a pretrained backbone the paper's freeze-then-ramp (150 steps frozen with BatchNorm
# training, a 40-step ramp from 2e-4), from scratch plain training.
# No augmentation, and with --aug nnunet-like no mirroring: on the demo's fold 0 from scratch,
# any mirrored axis costs Dice at 450 steps, X most (it swaps the phantoms' sided kidneys;
# docs/augmentation.md).
DEMO = dict(steps=450, batch_size=2, patch_size=(32, 32, 16), eval_patch_size=(96, 96, 48), lr=2e-3,
            freeze_steps=150, ramp_steps=40, ramp_start_lr=2e-4, frozen_bn="train", warmup_steps=0,
            aug="none", mirror_axes=())
DEMO_SCRATCH = dict(DEMO, freeze_steps=0, ramp_steps=0)
CONFIG = ("steps", "batch_size", "patch_size", "eval_patch_size", "lr", "folds", "freeze_steps", "ramp_steps",
          "ramp_start_lr", "backbone_lr_scale", "warmup_steps", "frozen_bn", "aug", "mirror_axes", "eval_every",
          "bn_batches")
FROZEN_ONLY = ("freeze_steps", "ramp_steps", "ramp_start_lr", "frozen_bn")   # settings of a frozen backbone


# ----------------------------------------------------------------------------- the training step

class Training:
    """One step's forward and loss (softmax CE + soft Dice on the augmented patch). A variant
    (experiments/neighbours/) subclasses it: its own flags, check, forward, loss and after-step update."""
    name, script, demo, keys = "plain", "finetune.py", {}, ()

    def __init__(self, model, cfg, seed, device):
        self.cfg = cfg

    @staticmethod
    def add_arguments(p):
        pass

    @staticmethod
    def check(cfg):
        """ValueError, one line, for a setting of its own this variant cannot honour."""

    def runner(self, model):
        """What one forward call runs (DDP wraps it)."""
        return model

    def loss(self, net, x, y, amp_dtype=None):
        """x (b, 1, X, Y, Z), y (b, X, Y, Z) -> scalar."""
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(x)                                    # (b, K, X, Y, Z)
        return segmentation_loss(logits.float(), y)

    def after_step(self, model):
        pass


def backbone_lr(step, cfg):
    """Sec. 3.2: 0 while frozen, then exponential from ramp_start_lr to lr over ramp_steps; both
    times --backbone-lr-scale (1: the paper; nnssl gives pretrained weights a 10x lower lr)."""
    t, scale = step - cfg["freeze_steps"], cfg["backbone_lr_scale"]
    if t < 0:
        return 0.0
    if t >= cfg["ramp_steps"]:
        return cfg["lr"] * scale
    return scale * cfg["ramp_start_lr"] * (cfg["lr"] / cfg["ramp_start_lr"]) ** (t / cfg["ramp_steps"])


def warmup(step, cfg):
    """--warmup-steps W: every learning rate grows linearly over the first W steps (nnssl's warm-up)."""
    return min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else 1.0


def apply_schedule(step, model, optimizer, cfg):
    """This step's learning rates. At backbone lr 0 the backbone is frozen for real (no gradients,
    BatchNorm in eval mode), except with --frozen-bn train (Lightning's train_bn, the authors'
    setting): then its BatchNorm layers keep training, at the head's lr, with batch statistics."""
    lr, factor = backbone_lr(step, cfg), warmup(step, cfg)
    bn_trains = cfg["frozen_bn"] == "train"
    if any(p.requires_grad for p in backbone_weights(model, bn=False)) != (lr > 0):
        set_backbone_trainable(model, lr > 0, keep_batchnorm=bn_trains)
    for group in optimizer.param_groups:
        group["lr"] = factor * {"head": cfg["lr"], "backbone": lr,
                                "backbone_bn": cfg["lr"] if lr == 0 and bn_trains else lr}[group["name"]]


def backbone_weights(model, bn):
    """The backbone's BatchNorm parameters (bn=True) or all its others."""
    norms = {id(p) for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             for p in m.parameters()}
    return [p for p in model.backbone.parameters() if (id(p) in norms) == bn]


def make_optimizer(model, lr):
    """Adam over the head, the backbone and the backbone's BatchNorm parameters, each its own
    group so the schedule can freeze or scale them."""
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [dict(params=head, lr=lr, name="head"),
              dict(params=backbone_weights(model, bn=False), lr=lr, name="backbone"),
              dict(params=backbone_weights(model, bn=True), lr=lr, name="backbone_bn")]
    return torch.optim.Adam(groups, lr=lr)


def weight_change(model, initial):
    """Per backbone level, how far training moved the weights: ||w - w0|| / ||w0|| over the
    level's encoder and decoder parameters (level = the index in their names; stem: level 0)."""
    now = model.backbone.state_dict()
    sums = {}
    for name, w0 in initial.items():
        if not w0.is_floating_point() or name.endswith(("running_mean", "running_var")):
            continue
        parts = name.split(".")
        level = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0
        moved, size = sums.get(level, (0.0, 0.0))
        sums[level] = (moved + float((now[name].float() - w0.float()).pow(2).sum()), size + float(w0.float().pow(2).sum()))
    return {str(level): (moved / size) ** 0.5 if size else None for level, (moved, size) in sorted(sums.items())}


def make_loader(data_dir, train_ids, cfg, seed, workers, device):
    """Rank r of W reads items (s * W + r) * b + j of a dataset whose item i is a fixed function of
    (seed, i): W processes see exactly the batches of one (--batch-size is the global batch)."""
    rank, world = world_info()
    b = cfg["batch_size"] // world
    dataset = LabelledPatchDataset(data_dir, train_ids, patch_size=cfg["patch_size"],
                                   length=cfg["steps"] * cfg["batch_size"], seed=seed)
    order = [(s * world + rank) * b + j for s in range(cfg["steps"]) for j in range(b)]
    return torch.utils.data.DataLoader(dataset, batch_size=b, sampler=order, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def train_segmenter(model, data_dir, train_ids, cfg, args, device, desc="train", training=Training, score=None):
    """The loop: schedule -> augment -> forward + loss -> backward -> step. DDP is re-wrapped when
    the schedule changes which parameters train (DDP fixes that set when it is built). Every
    patch draws its own augmentation from one seeded stream on the device (per rank).
    With --eval-every N and score(model) -> Dice, returns [[step, Dice], ...] every N steps (rank 0)."""
    rank, world = world_info()
    loader = make_loader(data_dir, train_ids, cfg, args.seed, args.workers, device)
    optimizer = make_optimizer(model, cfg["lr"])
    prepare_training(device)
    amp_dtype = training_autocast_dtype(device, args.amp, cfg["patch_size"], model.backbone.num_levels)
    aug_generator = torch.Generator(device=device).manual_seed(args.seed * 7919 + 29 + rank)
    step_hook = training(model, cfg, args.seed, device)
    runner, net, trains, losses = step_hook.runner(model), None, None, torch.zeros((), device=device)
    curve = []
    bar = tqdm(loader, total=cfg["steps"], desc=desc, dynamic_ncols=True, leave=False, disable=rank != 0)
    for step, batch in enumerate(bar):
        apply_schedule(step, model, optimizer, cfg)
        trains_now = tuple(p.requires_grad for p in model.parameters())
        if net is None or (world > 1 and trains_now != trains):
            trains = trains_now
            net = wrap_ddp(runner, device)
        x = batch["image"].to(device, non_blocking=True)   # (b, 1, X, Y, Z)
        y = batch["label"].to(device, non_blocking=True)   # (b, X, Y, Z)
        x, y = supervised_augment(x, y, aug_generator, cfg["aug"], cfg["mirror_axes"])
        loss = step_hook.loss(net, x.contiguous(memory_format=torch.channels_last_3d), y, amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_hook.after_step(model)
        losses += loss.detach()
        if (step + 1) % 25 == 0:
            bar.set_postfix(loss=f"{losses.item() / 25:.3f}")
            losses.zero_()
        if score is not None and cfg["eval_every"] and (step + 1) % cfg["eval_every"] == 0 and rank == 0:
            curve.append([step + 1, score(model)])
    return curve


@torch.no_grad()
def reestimate_batchnorm(model, data_dir, train_ids, cfg, device, seed):
    """Replace every BatchNorm's running statistics by their plain average over cfg["bn_batches"]
    batches of (un-augmented) training patches, the weights fixed ("precise BN", Wu & Johnson
    2021): the running statistics are an exponential average over the last few small batches,
    taken while the weights still moved (docs/history.md shows a fold this rescued)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                     # cumulative average instead of an exponential one
    batches = cfg["bn_batches"]
    dataset = LabelledPatchDataset(data_dir, train_ids, patch_size=cfg["patch_size"],
                                   length=batches * cfg["batch_size"], seed=seed)
    model.train()
    for b in range(batches):
        items = [dataset[b * cfg["batch_size"] + j] for j in range(cfg["batch_size"])]
        x = torch.stack([it["image"] for it in items]).to(device).contiguous(memory_format=torch.channels_last_3d)
        model(x)                              # (b, 1, X, Y, Z): only the statistics change
    for m in norms:
        m.momentum = 0.1
    return model.train(was_training)


def save_model(path, model, names, data_dir, cfg, fold, train_ids):
    meta = load_dataset_json(data_dir)
    save_torch(dict(kind="segmenter", version=CHECKPOINT_VERSION, model_config=model.config,
                    state_dict=model.state_dict(), labels={str(k): v for k, v in names.items()},
                    modality=meta["modality"], preset=meta["preset"], patch_size=list(cfg["eval_patch_size"]),
                    aug=cfg["aug"], mirror_axes=list(cfg["mirror_axes"]) if cfg["aug"] != "none" else [],
                    fold=fold, train_cases=list(train_ids)), path)


# ----------------------------------------------------------------------------- main

def check_config(args, cfg, training):
    """A setting the run cannot honour is refused before any work, naming the flag and what works."""
    if cfg["eval_every"] and cfg["eval_every"] > cfg["steps"]:
        raise ValueError(f"--eval-every {cfg['eval_every']} is past the end of the run (--steps {cfg['steps']}): "
                         f"give at most {cfg['steps']}")
    if cfg["warmup_steps"] >= cfg["steps"]:
        raise ValueError(f"--warmup-steps {cfg['warmup_steps']} is not shorter than --steps {cfg['steps']}: the lr "
                         f"would never reach --lr; give fewer than {cfg['steps']}")
    reasons = {f: "with --init random nothing is frozen" for f in FROZEN_ONLY} if args.init == "random" else {}
    if cfg["freeze_steps"] == 0:
        reasons.setdefault("frozen_bn", "with --freeze-steps 0 nothing is frozen")
    if cfg["ramp_steps"] == 0:
        reasons.setdefault("ramp_start_lr", "with --ramp-steps 0 there is no ramp")
    if cfg["aug"] == "none":
        reasons["mirror_axes"] = "with --aug none nothing is mirrored"
    for flag in args.explicit:
        if flag in reasons:
            raise ValueError(f"--{flag.replace('_', '-')} has no effect in this run ({reasons[flag]}); leave it out")
    training.check(cfg)


def main(args, training=Training):
    if args.evaluate_saved and args.checkpoint is None and args.init is None:
        args.init = "random"     # the weights come from OUT/model_fold<k>.pt: where training started is not needed
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in CONFIG + training.keys}
    if args.init == "random":   # from scratch: the whole network trains at lr from step 0
        cfg.update(freeze_steps=0, ramp_steps=0)
    try:
        check_config(args, cfg, training)
    except ValueError as e:
        sys.exit(f"{training.script}: error: {e}")
    outputs = () if args.evaluate_saved else ("results.json", "model_fold*.pt")
    device, data_dir, test_dir, names, plan = prepare(args, "nonlinear", training.script, cfg["batch_size"], outputs)
    out = Path(args.out)
    missing = [f"model_fold{fold}.pt" for fold, _, _ in plan if not (out / f"model_fold{fold}.pt").is_file()]
    if args.evaluate_saved and missing:
        sys.exit(f"{training.script}: error: --evaluate-saved evaluates the models of an earlier run of this command, "
                 f"but {out} has no {', '.join(missing)}")
    amp_dtype = autocast_dtype(device, args.amp)
    announce("fine-tune", args, cfg, device, amp_dtype)
    rank, world = world_info()
    fold_dice, cases, moved, curves, started = {}, {}, {}, {}, time.time()
    for fold, train_ids, test_ids in plan:
        cases[fold] = (train_ids, test_ids)
        model, info = new_segmenter(args, len(names), "nonlinear", device, fold)
        initial = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
        if args.evaluate_saved:   # the trained weights of an earlier run of the same command
            load_saved(model, out / f"model_fold{fold}.pt", train_ids)
        else:
            def score(m, fold=fold, train_ids=train_ids, test_ids=test_ids):   # Dice of a copy with precise BN
                twin = reestimate_batchnorm(copy.deepcopy(m), data_dir, train_ids, cfg, device, args.seed + 1000 + fold)
                return fold_mean(evaluate(twin, test_dir or data_dir, test_ids, len(names), cfg["eval_patch_size"],
                                          device, amp_dtype))
            curves[str(fold)] = train_segmenter(model, data_dir, train_ids, cfg, args, device, desc=f"fold {fold}",
                                                training=training, score=score)
        if not args.evaluate_saved:
            moved[str(fold)] = weight_change(model, initial)  # how far training moved each backbone level
        reestimate_batchnorm(model, data_dir, train_ids, cfg, device, seed=args.seed + 1000 + fold)
        if rank == 0:       # under torchrun, rank 0 alone evaluates and writes; the others wait
            save_model(out / f"model_fold{fold}.pt", model, names, data_dir, cfg, fold, train_ids)
            fold_dice[fold] = evaluate(model, test_dir or data_dir, test_ids, len(names), cfg["eval_patch_size"],
                                       device, amp_dtype)
            print(f"fold {fold}: {len(train_ids)} train / {len(test_ids)} test cases, "
                  f"mean Dice {fold_mean(fold_dice[fold]):.3f}")
        if world > 1:
            dist.barrier()
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return None
    results = write_results(args, cfg, fold_dice, names, info, cases, started, "fine-tune",
                            extra=dict(weight_change=moved, **({"curve": curves} if cfg["eval_every"] else {})))
    release_folder(out)
    return results


def load_saved(model, path, train_ids):
    try:
        saved, ckpt = load_model(path)
    except ValueError as e:
        sys.exit(f"finetune.py: error: {e}")
    if ckpt["train_cases"] != list(train_ids):
        sys.exit(f"finetune.py: error: {path} was trained on other cases")
    model.load_state_dict(saved.state_dict())


def build_parser(training=Training):
    p = argparse.ArgumentParser(description=(training.__doc__ if training is not Training else __doc__).split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    add_common_args(p)
    # Optimisation and the schedule of Sec. 3.2
    p.add_argument("--steps", type=positive_int, default=45_000)
    p.add_argument("--batch-size", type=positive_int, default=7, help="global over torchrun processes")
    p.add_argument("--patch-size", type=positive_int, nargs=3, default=(128, 128, 32), help="training patch (X, Y, Z)")
    p.add_argument("--lr", type=positive_float, default=3e-4, help="Adam learning rate")
    p.add_argument("--freeze-steps", type=non_negative_int, default=15_000, help="backbone frozen this long")
    p.add_argument("--ramp-steps", type=non_negative_int, default=1_200, help="exponential backbone-lr ramp")
    p.add_argument("--ramp-start-lr", type=positive_float, default=3e-5)
    p.add_argument("--backbone-lr-scale", type=positive_float, default=1.0,
                   help="the backbone's lr is this times --lr (and its ramp with it)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0,
                   help="every lr grows linearly over these first steps (nnssl's warm-up; 0: none)")
    p.add_argument("--frozen-bn", choices=["eval", "train"], default="eval",
                   help="a frozen backbone's BatchNorm: fixed statistics and weights (eval), or trained "
                        "at the head's lr on batch statistics (train: the authors' Lightning default)")
    p.add_argument("--aug", choices=SUPERVISED_KINDS, default="nnunet-like",
                   help="augmentation of every training patch (supervised_augment.py): nnU-Net's spatial + "
                        "intensity defaults; 'none' is the paper's protocol. Applies to --init random too")
    p.add_argument("--mirror-axes", type=axis, nargs="*", default=(0, 1, 2),
                   help="axes --aug nnunet-like may mirror (nnU-Net's allowed mirroring axes; none: no mirroring); "
                        "leave 0 (X, left-right) out when classes are sided. predict.py mirrors the same axes")
    p.add_argument("--workers", type=non_negative_int, default=1, help="DataLoader processes")
    p.add_argument("--eval-every", type=positive_int,
                   help="also record the test Dice every this many steps (a copy with re-estimated BatchNorm) "
                        "in results.json 'curve' [off]")
    p.add_argument("--bn-batches", type=positive_int, default=100,
                   help="training batches over which BatchNorm statistics are re-estimated before each evaluation")
    p.add_argument("--evaluate-saved", action="store_true",
                   help="no training: take OUT/model_fold<k>.pt of an earlier run of this command, "
                        "re-estimate its BatchNorm statistics and evaluate it again")
    training.add_arguments(p)
    return p


def parse_args(argv=None, training=Training):
    """The paper's defaults, then the demo preset (DEMO, or DEMO_SCRATCH for --init random, and
    the variant's own), then the flags given."""
    demo = lambda first: {**(DEMO_SCRATCH if first.init == "random" else DEMO), **training.demo}
    return parse_with_presets(build_parser(training), argv, presets(demo))


if __name__ == "__main__":
    try:
        main(parse_args())
    except KeyboardInterrupt:
        sys.exit("finetune.py: interrupted; OUT/model_fold<k>.pt of finished folds are kept")
