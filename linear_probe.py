"""Linear evaluation of a pretrained FPN: frozen backbone + linear head, Dice per class.

Implements the linear evaluation protocol of Kats et al. 2024, Sec. 3.2 (Tables 1-2): the
backbone is frozen; each pyramid level goes through its own 1x1x1 convolution to the class
count; the outputs are upsampled to full resolution and summed (model.LinearHead). Training
uses per-class sigmoid BCE + soft Dice with Adam at 3e-4 (reference code); evaluation is
sliding-window inference over whole held-out volumes, k-fold cross-validation (3 folds as for
BTCV), Dice per class on the thresholded prediction.

Run it:
    python linear_probe.py --data demo --checkpoint runs/pretrain-demo/backbone.pt --out runs/probe-demo
    python linear_probe.py --data demo --init random --out runs/probe-random   # the baseline beside it
    python linear_probe.py --data DATA_DIR --checkpoint backbone.pt --out DIR --folds 3 --steps 45000

Writes DIR/results.json (mean_dice, std_dice over folds, per_class, per-fold numbers, the
arguments and the checkpoint evaluated) and prints a table. Dice per class ignores, in each
volume, a class absent from both the prediction and the label (loss.dice_per_class); the mean
over classes is then taken per volume, over volumes per fold, and mean +- std over folds.

finetune.py reuses the pieces below (fold split, training loop, evaluation, results table).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import LabelledPatchDataset, list_cases, load_case, load_dataset_json, sliding_window_inference
from loss import dice_per_class, predict_labels, segmentation_loss
from model import ARCHS, SegmentationModel
from pretrain import DEMO_ARCHS, setup_distributed
from preprocess import resolve_data_dir

PAPER = dict(steps=45_000, batch_size=7, patch_size=(128, 128, 32), eval_patch_size=(128, 128, 32), lr=3e-4, folds=3)
# The FPN is fully convolutional, so inference may use larger windows than training: fewer tiles.
DEMO = dict(steps=600, batch_size=2, patch_size=(48, 48, 16), eval_patch_size=(192, 176, 80), folds=3,
            lr=3e-3)  # a short CPU budget: 10x the paper's lr, which was tuned for 45k steps


# ----------------------------------------------------------------------------- backbone

def load_backbone(path):
    """Read a backbone file written by pretrain.py. Returns (backbone_config, state_dict, info)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle error, truncated file, ... : say which file
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "backbone":
        kind = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a backbone file from pretrain.py (kind: {kind}); "
                         "pass RUN_DIR/backbone.pt")
    return ckpt["backbone_config"], ckpt["state_dict"], dict(step=ckpt.get("step"), arch=ckpt.get("arch"))


def load_backbone_weights(model, state_dict, path):
    """Load into model.backbone, naming exactly which keys do not fit (MAE's habit)."""
    try:
        model.backbone.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the backbone it describes: {str(e)[:500]}") from None


def is_demo(args):
    return (args.preset or ("demo" if args.data == "demo" else "paper")) == "demo"


def random_backbone_config(args):
    preset = (DEMO_ARCHS if is_demo(args) else ARCHS)[args.arch]
    return dict(in_channels=1, base_channels=args.base_channels or preset["base_channels"],
                num_levels=args.num_levels or preset["num_levels"])


def build_segmenter(args, num_foreground, head):
    """SegmentationModel from --checkpoint (architecture read from the file) or --init random."""
    if args.checkpoint:
        backbone_config, state, info = load_backbone(args.checkpoint)
        model = SegmentationModel(backbone_config, num_foreground, head=head)
        load_backbone_weights(model, state, args.checkpoint)
    else:
        model = SegmentationModel(random_backbone_config(args), num_foreground, head=head)
        info = dict(step=0, arch=args.arch)
    return model, info


def set_backbone_trainable(model, trainable):
    """Freeze for real: no gradients, and eval mode so BatchNorm statistics stay as pretrained."""
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)
    model.backbone.train(trainable and model.training)


# ----------------------------------------------------------------------------- data

def label_names(data_dir):
    labels = load_dataset_json(data_dir).get("labels")
    if not labels:
        raise ValueError(f"{data_dir}/dataset.json has no labels: this stage needs labelled cases")
    return {int(k): v for k, v in labels.items()}


def split_folds(case_ids, folds, seed):
    """Shuffle once with the seed, then deal the cases into `folds` test sets."""
    if folds < 2 or folds > len(case_ids):
        raise ValueError(f"--folds {folds} needs 2 <= folds <= {len(case_ids)} labelled cases")
    order = np.random.default_rng(seed).permutation(len(case_ids))
    ids = [case_ids[i] for i in order]
    return [(sorted(c for j, c in enumerate(ids) if j % folds != k),
             sorted(c for j, c in enumerate(ids) if j % folds == k)) for k in range(folds)]


def plan_folds(args, data_dir, test_dir):
    """[(fold, train_ids, test_ids)] for cross-validation, or one split for --test-data."""
    train_all = list_cases(data_dir, labelled=True)
    if not train_all:
        raise ValueError(f"{data_dir}: no labelled cases")
    if test_dir is not None:
        if label_names(test_dir) != label_names(data_dir):
            raise ValueError(f"label sets differ: {data_dir}/dataset.json {label_names(data_dir)} vs "
                             f"{test_dir}/dataset.json {label_names(test_dir)}")
        plan = [(0, train_all, list_cases(test_dir, labelled=True))]
    else:
        plan = [(k, tr, te) for k, (tr, te) in enumerate(split_folds(train_all, args.folds, args.seed))]
    if args.fold is not None:
        if not 0 <= args.fold < len(plan):
            raise ValueError(f"--fold {args.fold} out of range 0..{len(plan) - 1}")
        plan = [plan[args.fold]]
    if args.train_cases is not None:   # label budget: the first N of a fixed shuffle of the fold's training cases
        rng = np.random.default_rng(args.seed + 1)
        plan = [(k, sorted(rng.permutation(tr)[:args.train_cases].tolist()), te) for k, tr, te in plan]
    return plan


# ----------------------------------------------------------------------------- train / evaluate

def world_info():
    """(rank, world size): (0, 1) unless launched by torchrun (pretrain.setup_distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_segmenter(model, data_dir, train_ids, cfg, args, device, on_step=None, desc="train"):
    """The downstream training loop. `on_step(step, model, optimizer)` applies schedules (finetune.py).

    Under torchrun, --batch-size is the global batch: rank r reads items (s * W + r) * b + j of a
    dataset whose item i is a fixed function of (seed, i), so W processes see exactly the
    batches of one. DDP averages the gradients; it is re-wrapped when a schedule changes which
    parameters train (DDP fixes that set when it is built), e.g. when finetune.py unfreezes."""
    rank, world = world_info()
    b = cfg["batch_size"] // world
    dataset = LabelledPatchDataset(data_dir, train_ids, patch_size=cfg["patch_size"],
                                   length=cfg["steps"] * cfg["batch_size"], seed=args.seed)
    order = [(s * world + rank) * b + j for s in range(cfg["steps"]) for j in range(b)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=b, sampler=order,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    optimizer = make_optimizer(model, cfg["lr"])
    amp = device.type == "cuda" and args.amp
    losses = torch.zeros((), device=device)
    net, trains = model, None
    bar = tqdm(loader, total=cfg["steps"], desc=desc, dynamic_ncols=True, leave=False, disable=rank != 0)
    for step, batch in enumerate(bar):
        if on_step is not None:
            on_step(step, model, optimizer)
        if world > 1 and trains != (now := tuple(p.requires_grad for p in model.parameters())):
            trains = now
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last_3d)  # (b, 1, X, Y, Z)
        y = batch["label"].to(device, non_blocking=True)   # (b, X, Y, Z)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x)                                # (b, K-1, X, Y, Z)
        loss = segmentation_loss(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses += loss.detach()
        if (step + 1) % 25 == 0:
            bar.set_postfix(loss=f"{losses.item() / 25:.3f}")
            losses.zero_()
    return model


def make_optimizer(model, lr):
    """Adam over the head, plus a separate (possibly frozen) group for the backbone."""
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [dict(params=head, lr=lr, name="head"),
              dict(params=list(model.backbone.parameters()), lr=lr, name="backbone")]
    return torch.optim.Adam(groups, lr=lr)


@torch.no_grad()
def predict_volume(model, image, patch_size, device, amp=True, overlap=0.5, batch_size=2):
    """Sliding-window segmentation of one preprocessed volume (X, Y, Z) -> labels (X, Y, Z) int64."""
    model.eval()
    x = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)[None]   # (1, X, Y, Z)
    # No window larger than the volume needs: shrink it to the volume rounded up to what the FPN divides.
    m = 2 ** (model.backbone.num_levels - 1)
    patch_size = tuple(min(p, -(-s // m) * m) for p, s in zip(patch_size, x.shape[1:]))

    def probabilities(tiles):                                                      # (b, 1, *patch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            tiles = tiles.contiguous(memory_format=torch.channels_last_3d)
            return torch.sigmoid(model(tiles).float())                              # (b, K-1, *patch)

    probs = sliding_window_inference(x, probabilities, patch_size, overlap=overlap, batch_size=batch_size)
    return predict_labels(torch.logit(probs.clamp(1e-6, 1 - 1e-6))[None])[0].cpu()  # (X, Y, Z)


def evaluate(model, data_dir, test_ids, num_classes, cfg, args, device):
    """Dice per foreground class for each test volume: (len(test_ids), num_classes - 1)."""
    rows = []
    for case_id in tqdm(test_ids, desc="evaluate", leave=False):
        case = load_case(data_dir, case_id)
        pred = predict_volume(model, case["image"], cfg["eval_patch_size"], device, amp=args.amp)
        rows.append(dice_per_class(pred.numpy(), np.asarray(case["label"]), num_classes))
    return np.stack(rows)


def summarise(fold_dice, names):
    """fold_dice: {fold: (cases, K-1) array}. Mean over classes per volume (NaN classes ignored),
    over volumes per fold; mean +- std over folds. Per class: mean over all volumes of all folds."""
    fold_means = {k: float(np.nanmean(np.nanmean(d, axis=1))) for k, d in fold_dice.items()}
    all_rows = np.concatenate(list(fold_dice.values()))
    per_class = {names[c + 1]: float(np.nanmean(all_rows[:, c])) if not np.all(np.isnan(all_rows[:, c])) else None
                 for c in range(all_rows.shape[1])}
    means = np.array(list(fold_means.values()))
    return dict(mean_dice=float(means.mean()), std_dice=float(means.std()), per_class=per_class,
                folds={str(k): v for k, v in fold_means.items()})


def print_table(title, results):
    print(f"\n{title}")
    for name, d in results["per_class"].items():
        print(f"  {name:<16} {'n/a' if d is None else f'{d:.3f}'}")
    print(f"  {'mean':<16} {results['mean_dice']:.3f} +- {results['std_dice']:.3f} "
          f"(over {len(results['folds'])} fold(s): {', '.join(f'{v:.3f}' for v in results['folds'].values())})")


def write_json(path, obj):
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def resolve(args, paper, demo):
    cfg = dict(paper)
    if is_demo(args):
        cfg.update(demo)
    cfg.update({k: v for k, v in vars(args).items() if k in paper and v is not None})
    cfg["patch_size"], cfg["eval_patch_size"] = tuple(cfg["patch_size"]), tuple(cfg["eval_patch_size"])
    return cfg


def check_init(args):
    if (args.checkpoint is None) == (args.init != "random"):
        raise ValueError("give exactly one of --checkpoint BACKBONE.pt or --init random")


def setup(args, paper, demo, head, script):
    """Shared start of linear_probe.py and finetune.py: config, device, folds, and every input
    problem (data, labels, checkpoint) reported as one clear line before any training."""
    try:
        check_init(args)
        cfg = resolve(args, paper, demo)
        args.folds = cfg["folds"]
        data_dir = resolve_data_dir(args.data)
        test_dir = resolve_data_dir(args.test_data) if args.test_data else None
        names = label_names(data_dir)
        plan = plan_folds(args, data_dir, test_dir)
        build_segmenter(args, len(names) - 1, head)   # fail fast on a bad checkpoint
    except ValueError as e:
        sys.exit(f"{script}: error: {e}")
    rank, world, device = setup_distributed(args.device)
    if cfg["batch_size"] % world:
        sys.exit(f"{script}: error: --batch-size {cfg['batch_size']} is the global batch: it must split "
                 f"evenly over {world} processes")
    return cfg, device, data_dir, test_dir, names, plan


def cross_validate(args, cfg, device, data_dir, test_dir, names, plan, head, train_fold, title):
    """For each fold: a fresh segmenter, `train_fold(model, fold, train_ids)`, sliding-window
    evaluation of its test cases. Writes OUT/results.json and prints the table."""
    rank, world = world_info()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        print(f"{title} on {world} x {device}: {args.checkpoint or 'random init'}, config {json.dumps(cfg)}")
    fold_dice, t0 = {}, time.time()
    for fold, train_ids, test_ids in plan:
        torch.manual_seed(args.seed + fold)
        model, info = build_segmenter(args, len(names) - 1, head)
        model.to(device, memory_format=torch.channels_last_3d).train()
        train_fold(model, fold, train_ids)
        if rank == 0:       # under torchrun, rank 0 alone evaluates and writes; the others wait
            fold_dice[fold] = evaluate(model, test_dir or data_dir, test_ids, len(names), cfg, args, device)
            print(f"fold {fold}: {len(train_ids)} train / {len(test_ids)} test cases, "
                  f"mean Dice {np.nanmean(np.nanmean(fold_dice[fold], axis=1)):.3f}")
        if world > 1:
            dist.barrier()
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return None
    plain = lambda d: {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    results = summarise(fold_dice, names)
    results.update(checkpoint=str(args.checkpoint) if args.checkpoint else None, init=args.init or "checkpoint",
                   backbone_step=info["step"], args=plain(vars(args)), config=plain(cfg),
                   seconds=round(time.time() - t0, 1))
    write_json(out / "results.json", results)
    print_table(f"{title}, {args.checkpoint or 'random init'}", results)
    return results


def main(args):
    cfg, device, data_dir, test_dir, names, plan = setup(args, PAPER, DEMO, "linear", "linear_probe.py")

    def train_fold(model, fold, train_ids):
        set_backbone_trainable(model, False)
        before = [p.detach().clone() for p in model.backbone.parameters()]
        train_segmenter(model, data_dir, train_ids, cfg, args, device, desc=f"fold {fold}")
        # The check that only the head trained (MAE's probe left its encoder in train mode).
        assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))

    return cross_validate(args, cfg, device, data_dir, test_dir, names, plan, "linear", train_fold, "linear probe")


def add_common_args(p, required=True):
    """The flags linear_probe.py and finetune.py share (finetune's --predict needs none of them)."""
    # Data and protocol
    p.add_argument("--data", required=required, help="preprocessed DATA_DIR, or 'demo'")
    p.add_argument("--test-data", help="evaluate on this labelled set instead of cross-validation")
    p.add_argument("--out", required=required, help="folder for results.json (and models)")
    p.add_argument("--folds", type=int, help="k of k-fold cross-validation [3]")
    p.add_argument("--fold", type=int, help="run only this fold")
    p.add_argument("--train-cases", type=int, help="label budget: training cases per fold [all]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=["paper", "demo"], help="defaults to start from [demo for --data demo, else paper]")
    # Backbone
    p.add_argument("--checkpoint", help="backbone.pt from pretrain.py")
    p.add_argument("--init", choices=["random"], help="random-init baseline instead of --checkpoint")
    p.add_argument("--arch", choices=sorted(ARCHS), default="balanced", help="architecture for --init random")
    p.add_argument("--base-channels", type=int, help="for --init random [from --arch / demo preset]")
    p.add_argument("--num-levels", type=int, help="for --init random [from --arch / demo preset]")
    # Optimisation
    p.add_argument("--steps", type=int, help="[45000; demo: the script's DEMO preset]")
    p.add_argument("--batch-size", type=int, help="[7; demo 2]")
    p.add_argument("--patch-size", type=int, nargs=3, help="[128 128 32; demo 48 48 16]")
    p.add_argument("--eval-patch-size", type=int, nargs=3, help="sliding-window size at evaluation [128 128 32; demo 192 176 80: one window covers a demo volume]")
    p.add_argument("--lr", type=float, help="Adam learning rate [3e-4; demo: the script's DEMO preset]")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
