"""Linear evaluation of a pretrained FPN: frozen backbone + linear head, Dice per class.

Kats et al. 2024, Sec. 3.2 (Tables 1-2): the backbone is frozen; each pyramid level goes through
its own 1x1x1 convolution to the class count, upsampled to full resolution and summed
(model.LinearHead); k-fold cross-validation, Dice per class on whole held-out volumes.

    python linear_probe.py --data demo --split --checkpoint runs/pretrain-demo --out runs/probe
    python linear_probe.py --data demo --split --init random --out runs/probe-random  # the baseline
    python linear_probe.py --data DATA_DIR --checkpoint runs/ct --out DIR --folds 3

The frozen backbone's pyramid is a fixed function of a volume: it is computed once per volume
(whole, or Gaussian-blended windows of --eval-patch-size) and cached, each level at its own
resolution in float16 (85 bytes a voxel for the paper's FPN: ~0.8 GB for a 300 x 250 x 120 CT;
above --cache-ram-gb, memory-mapped files). As the head is linear and nearest upsampling reads
level l at (x >> l, y >> l, z >> l), a voxel's logit is a linear function of the levels gathered
there (LinearHead.forward_voxels): the head is fitted on a fixed class-balanced sample of training
voxels (cross-entropy + a small L2 penalty, full-batch L-BFGS) and evaluated as a convolution over
the cached pyramids, never calling the backbone while it trains. Each channel is standardised with
the training volumes' mean and SD first (an affine map: still a linear probe, and the features'
scale no longer decides how the solver converges). Deviation: the reference trains the head end
to end on patches with Adam; here the convex problem on sampled voxels is solved (docs/speed.md).
DIR/results.json holds the table (the mean over classes per volume, over volumes per fold, and
mean +- std over folds; a class absent from prediction and label is ignored in that volume).
"""
import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import downstream
import runtime
from data import read_case
from data import InputError
from downstream import announce, fold_mean, new_segmenter, prepare, set_backbone_trainable
from downstream import write_results
from loss import dice_per_class, predict_labels
from runtime import non_negative_float, positive_int
from weights import nonfinite

# The demo's volumes are smaller than one window: each pyramid is computed whole.
DEMO = dict(eval_patch_size=(96, 96, 48))


# ----------------------------------------------------------------------------- the pyramid cache

@torch.no_grad()
def compute_pyramid(backbone, image, window, device, amp_dtype=None):
    """The frozen backbone's pyramid of one volume (C, X, Y, Z) -> list of float16 numpy arrays
    (C_l, X_l, Y_l, Z_l), X_l = ceil(X / 2**l): one forward pass when the volume fits in `window`,
    else Gaussian-blended windows whose starts are multiples of 2**(L-1), so that every window's
    level l lands exactly on level l's grid (downstream.sliding_window)."""
    backbone.eval()

    def run(tiles):                                                    # (b, C, ...) -> a pyramid
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return [level.float() for level in backbone(tiles)]

    x = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)  # (C, X, Y, Z)
    if all(s <= w for s, w in zip(x.shape[1:], window)):
        levels = [p[0] for p in run(x[None])]
    else:
        levels = downstream.sliding_window(x, run, window, overlap=0.5, batch_size=1,
                                           align=2 ** (backbone.num_levels - 1))
    return [level.to(torch.float16).cpu().numpy() for level in levels]


def cache_pyramids(backbone, data_dir, case_ids, window, device, cache_dir=None, ram_gb=4.0,
                   amp_dtype=None):
    """{case id: list of (C_l, X_l, Y_l, Z_l) float16 arrays}. In memory, or (when the estimated
    size exceeds ram_gb) as memory-mapped .npy files in cache_dir, read back lazily."""
    per_voxel = 2 * sum(c / 8 ** l for l, c in enumerate(backbone.channels))      # bytes, float16
    voxels = sum(int(np.prod(read_case(data_dir, c)["image"].shape[1:])) for c in case_ids)
    on_disk = per_voxel * voxels > ram_gb * 2 ** 30
    cache = {}
    for case_id in tqdm(case_ids, desc="cache pyramids", leave=False):
        levels = compute_pyramid(backbone, read_case(data_dir, case_id)["image"], window, device,
                                 amp_dtype)
        if on_disk:
            folder = Path(cache_dir) / case_id
            folder.mkdir(parents=True, exist_ok=True)
            for l, a in enumerate(levels):
                np.save(folder / f"level{l}.npy", a)
            levels = [np.load(folder / f"level{l}.npy", mmap_mode="r") for l in range(len(levels))]
        cache[case_id] = levels
    return cache


def channel_statistics(cache, case_ids):
    """Per-level channel mean and SD over every voxel of the training volumes (float64 sums)."""
    means, stds = [], []
    for l in range(len(cache[case_ids[0]])):
        s = s2 = n = 0
        for c in case_ids:
            a = np.asarray(cache[c][l], dtype=np.float64)
            a = a.reshape(len(a), -1)                                           # (C_l, V_l)
            s, s2, n = s + a.sum(1), s2 + (a * a).sum(1), n + a.shape[1]
        mean = s / n
        means.append(torch.tensor(mean, dtype=torch.float32))
        stds.append(torch.tensor(np.sqrt(np.maximum(s2 / n - mean ** 2, 0)), dtype=torch.float32))
    return means, stds


def as_tensors(levels, device, crop=None):
    """Cached levels -> list of (1, C_l, ...) float32 tensors; crop = (start, size) at full
    resolution with start and size multiples of 2**(L-1), or None for the whole volume."""
    out = []
    for l, a in enumerate(levels):
        if crop is not None:
            start, size = crop
            a = a[(slice(None), *(slice(s >> l, (s + n) >> l) for s, n in zip(start, size)))]
        out.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None].to(device))
    return out


# ----------------------------------------------------------------------------- training the head

def balanced_voxel_sample(label, num_classes, per_class, rng):
    """Class-balanced sample of one volume's voxels: for every class present (background
    included), min(count, per_class) of its voxels without replacement. label (X, Y, Z) ->
    coords (n, 3) int64, classes (n,) int64, voxels per class in the whole volume (num_classes,)."""
    flat = np.asarray(label).reshape(-1)
    counts = np.bincount(flat, minlength=num_classes)
    order = np.argsort(flat, kind="stable")                             # voxels grouped by class
    picked = []
    for c, group in zip(range(num_classes), np.split(order, np.cumsum(counts)[:-1])):
        if len(group):
            picked.append(group[rng.choice(len(group), min(per_class, len(group)), replace=False)])
    index = np.concatenate(picked)
    coords = np.stack(np.unravel_index(index, np.shape(label)), 1).astype(np.int64)  # (n, 3)
    return coords, flat[index].astype(np.int64), counts


def gather_levels(levels, coords):
    """Cached levels (C_l, X_l, Y_l, Z_l) read at the voxels' coarse indices -> [(n, C_l) float32]:
    exactly what nearest upsampling puts at those voxels."""
    out = []
    for l, a in enumerate(levels):
        c = coords >> l                                                 # (n, 3) on level l's grid
        voxels = np.asarray(a[:, c[:, 0], c[:, 1], c[:, 2]], dtype=np.float32).T     # (n, C_l)
        out.append(torch.from_numpy(np.ascontiguousarray(voxels)))
    return out


def train_head(head, cache, labels, train_ids, cfg, device, seed=0):
    """Fit the linear head (Sec. 3.2) on a fixed class-balanced sample of training voxels
    (--voxels-per-class per class and volume), gathered from the cached pyramids: multinomial
    logistic regression, cross-entropy with a small L2 penalty (--weight-decay), solved by
    full-batch L-BFGS for at most --max-steps iterations. Each voxel's loss is weighted by (its
    class's share of the training volumes) / (its share of the sample), so the sample's class
    balance shapes the rare classes' weights while the head still learns the volumes' class prior.
    Memory and time grow with the sample, not with the volumes. Returns (iterations, final loss)."""
    rng = np.random.default_rng(seed)
    num_classes = head.convs[0].out_channels
    per_level, classes, totals = [[] for _ in head.convs], [], np.zeros(num_classes)
    for case_id in train_ids:
        coords, y, counts = balanced_voxel_sample(labels[case_id], num_classes,
                                                  cfg["voxels_per_class"], rng)
        for l, f in enumerate(gather_levels(cache[case_id], coords)):
            per_level[l].append(f)
        classes.append(y)
        totals += counts
    features = [torch.cat(f).to(device) for f in per_level]                      # [(N, C_l)]
    y = np.concatenate(classes)
    sampled = np.bincount(y, minlength=num_classes)
    class_weight = np.where(sampled > 0,
                            (totals / totals.sum()) / np.maximum(sampled / len(y), 1e-12), 0.0)
    weights = torch.as_tensor(class_weight[y], dtype=torch.float32, device=device)  # (N,)
    y = torch.from_numpy(y).to(device)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=cfg["max_steps"],
                                  max_eval=5 * cfg["max_steps"],
                                  history_size=20, tolerance_grad=1e-7, tolerance_change=1e-10,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad(set_to_none=True)
        ce = F.cross_entropy(head.forward_voxels(features), y, reduction="none")  # (N,)
        loss = (ce * weights).sum() / weights.sum()
        loss = loss + cfg["weight_decay"] * sum(conv.weight.square().sum() for conv in head.convs)
        loss.backward()
        return loss

    optimizer.step(closure)
    iterations = next(iter(optimizer.state.values()))["n_iter"]
    return iterations, float(closure().detach())


@torch.no_grad()
def evaluate_cached(head, cache, labels, test_ids, num_classes, device):
    """Dice per foreground class of each test volume, from its cached pyramid: (cases, K-1)."""
    head.eval()
    rows = []
    for case_id in test_ids:
        pred = predict_labels(head(as_tensors(cache[case_id], device)))[0]       # (X, Y, Z)
        rows.append(dice_per_class(pred.cpu().numpy(), np.asarray(labels[case_id]), num_classes))
    head.train()
    return np.stack(rows)


# ----------------------------------------------------------------------------- main

def main(args):
    cfg = dict(voxels_per_class=args.voxels_per_class, max_steps=args.max_steps,
               weight_decay=args.weight_decay, eval_patch_size=tuple(args.eval_patch_size),
               folds=args.folds)
    run = prepare(args)
    if run.world > 1:
        raise InputError("the cached-feature probe runs in one process (it trains a linear head "
                         "only; torchrun gives it nothing)")
    runtime.claim_run(args.out, "linear_probe.py", ["results.json"], runtime.settings(args),
                      run.inputs, args.force)
    amp_dtype = runtime.amp_dtype(run.device, args.amp)
    announce("linear probe", args, cfg, run.device, amp_dtype)
    fold_dice, cases, steps, started = {}, {}, {}, time.time()
    if args.cache_dir:
        runtime.make_folder(Path(args.cache_dir), "--cache-dir")
    window, ram = cfg["eval_patch_size"], args.cache_ram_gb
    with tempfile.TemporaryDirectory(prefix="probe-cache-") as work:
        cache_dir = Path(args.cache_dir or work)
        for fold, train_ids, test_ids in run.plan:
            cases[fold] = (train_ids, test_ids)
            model, info = new_segmenter(args, run.backbone, len(run.names), "linear", run.device,
                                        fold, run.channels)
            set_backbone_trainable(model, False)          # eval mode, no gradients: frozen for real
            before = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
            cache = cache_pyramids(model.backbone, run.data_dir, train_ids, window, run.device,
                                   cache_dir / "train", ram, amp_dtype)
            model.head.set_statistics(*channel_statistics(cache, train_ids))
            labels = read_labels(train_ids, run.data_dir)
            n, loss = train_head(model.head, cache, labels, train_ids, cfg, run.device,
                                 args.seed + fold)
            if not math.isfinite(loss) or nonfinite(model.head.state_dict()):
                raise runtime.Diverged(f"fold {fold}: the linear head's loss ({loss}) or weights "
                                       f"are not finite after {n} L-BFGS steps; no result is "
                                       "reported (try a larger --weight-decay)")
            steps[str(fold)] = dict(steps=n, final_loss=round(loss, 5))
            print(f"fold {fold}: head trained {n} steps, final loss {loss:.4f}")
            # The check that only the head trained (MAE's probe left its encoder in train mode).
            assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
            test_cache = cache_pyramids(model.backbone, run.test_dir, test_ids, window, run.device,
                                        cache_dir / "test", ram, amp_dtype)
            labels = read_labels(test_ids, run.test_dir)
            fold_dice[fold] = evaluate_cached(model.head, test_cache, labels, test_ids,
                                              len(run.names), run.device)
            print(f"fold {fold}: {len(train_ids)} train / {len(test_ids)} test cases, "
                  f"mean Dice {fold_mean(fold_dice[fold]):.3f}")
    return write_results(args, cfg, fold_dice, run.names, info, cases, started, "linear probe",
                         extra=dict(head_training=steps))


def read_labels(ids, folder):
    return {c: np.asarray(read_case(folder, c, need_label=True)["label"]) for c in ids}


def preset(args):
    return downstream.preset(args, DEMO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    downstream.add_common_args(p)
    # The probe's own training (on voxels sampled from the cached pyramids)
    p.add_argument("--voxels-per-class", type=positive_int, default=2048,
                   help="training voxels sampled per class and volume")
    p.add_argument("--max-steps", type=positive_int, default=500,
                   help="cap on L-BFGS iterations of the head")
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4,
                   help="L2 penalty on the head's weights")
    p.add_argument("--cache-dir",
                   help="memory-mapped pyramid cache for large data [a temporary folder]")
    p.add_argument("--cache-ram-gb", type=non_negative_float, default=4.0,
                   help="keep the cache in memory below this size")
    return runtime.parse(p, argv, preset, downstream.refusals)


if __name__ == "__main__":
    runtime.cli(main, parse_args, interrupted="interrupted (a probe has no partial result to keep)")
