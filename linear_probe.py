"""Linear evaluation of a pretrained FPN: frozen backbone + linear head, Dice per class.

Implements the linear evaluation protocol of Kats et al. 2024, Sec. 3.2 (Tables 1-2): the
backbone is frozen; each pyramid level goes through its own 1x1x1 convolution to the class
count; the outputs are upsampled to full resolution and summed (model.LinearHead). Evaluation:
k-fold cross-validation (3 folds as for BTCV), Dice per class on whole held-out volumes.

Because the backbone is frozen, its pyramid is a fixed function of each volume: it is computed
once per volume (eval mode, whole volume, or Gaussian-blended windows of --eval-patch-size when
the volume is larger) and cached, every level at its own resolution in float16. The head is then
trained on the cached pyramids until its training loss plateaus, and evaluated on the cached
pyramids of the test volumes; the backbone is never called in the training loop. Each channel is
standardised with the mean and SD of the training volumes before the head (model.LinearHead's
`standardize`; MAE's linear probe does the same with a BatchNorm without affine parameters): an
affine map of the features, so still a linear probe, and the features' scale (a random-init
backbone's are far from unit scale) no longer decides how fast it learns.

Cache size: sum_l C_l / 8**l float16 values per voxel, i.e. 85 bytes per voxel for the paper's
balanced FPN (32, 64/8, 128/64, ...) and 43 for vox2vec's: ~0.8 GB for one 300 x 250 x 120 CT at
1 x 1 x 2 mm, ~25 GB for 30 BTCV volumes. Below --cache-ram-gb it stays in memory, above it is
written to memory-mapped files in --cache-dir (default OUT/cache). The demo needs ~0.1 GB.

Run it:
    python linear_probe.py --data demo --checkpoint runs/pretrain-demo/backbone.pt --out runs/probe-demo
    python linear_probe.py --data demo --init random --out runs/probe-random   # the baseline beside it
    python linear_probe.py --data DATA_DIR --checkpoint backbone.pt --out DIR --folds 3

Writes DIR/results.json (mean_dice, std_dice over folds, per_class, per-fold numbers, training
steps and final loss per fold, the arguments and the checkpoint evaluated) and prints a table.
Dice per class ignores, in each volume, a class absent from both the prediction and the label
(loss.dice_per_class); the mean over classes is taken per volume, over volumes per fold, and
mean +- std over folds. On the demo a fold took 56 s on 2 CPU cores (bench.py --probe), of which
5 s computing the pyramids; the head stopped at its plateau after 1,400-2,400 steps.
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import gaussian_weights, load_case, tile_starts
from downstream import (add_common_args, cross_validate, dice_per_class, set_backbone_trainable, setup,
                        world_info)
from loss import predict_labels, segmentation_loss

PAPER = dict(max_steps=5_000, lr=1e-2, crop_size=(192, 192, 96), eval_patch_size=(128, 128, 32), folds=3,
             plateau_window=100, plateau_tol=0.005, batch_size=1, patch_size=(128, 128, 32), steps=None)
# The demo's volumes are smaller than one window: each is cached and trained on whole.
DEMO = dict(eval_patch_size=(96, 96, 48), folds=3)


# ----------------------------------------------------------------------------- the pyramid cache

@torch.no_grad()
def compute_pyramid(backbone, image, window, device):
    """The frozen backbone's pyramid of one volume (X, Y, Z) -> list of float16 numpy arrays
    (C_l, X_l, Y_l, Z_l), X_l = ceil(X / 2**l). Whole volume in one forward pass when it fits in
    `window`, else Gaussian-blended tiles of `window` whose starts are multiples of 2**(L-1), so
    that every tile's level l lands exactly on level l's grid (the volume is zero-padded to a
    multiple of 2**(L-1) for that)."""
    backbone.eval()
    x = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)[None, None]  # (1, 1, X, Y, Z)
    shape = x.shape[2:]
    if all(s <= w for s, w in zip(shape, window)):
        return [p[0].to(torch.float16).cpu().numpy() for p in backbone(x)]
    m = 2 ** (backbone.num_levels - 1)
    window = tuple(max(m, w // m * m) for w in window)
    padded = tuple(max(-(-s // m) * m, w) for s, w in zip(shape, window))
    x = F.pad(x, [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]])
    starts = [tuple(t // m * m for t in st) for st in tile_starts(padded, window, overlap=0.5)]
    sums, norms = None, None
    for st in starts:
        box = tuple(slice(s, s + w) for s, w in zip(st, window))
        tile = backbone(x[(slice(None), slice(None)) + box])                    # list of (1, C_l, w/2**l ...)
        if sums is None:
            sums = [torch.zeros((t.shape[1],) + tuple(p // 2 ** l for p in padded), device=device)
                    for l, t in enumerate(tile)]
            norms = [torch.zeros(tuple(p // 2 ** l for p in padded), device=device) for l in range(len(tile))]
        for l, t in enumerate(tile):
            w = gaussian_weights(t.shape[2:], device)                           # (w_l, ...)
            sub = tuple(slice(s // 2 ** l, s // 2 ** l + n) for s, n in zip(st, t.shape[2:]))
            sums[l][(slice(None),) + sub] += t[0].float() * w
            norms[l][sub] += w
    return [(s / n)[(slice(None),) + tuple(slice(0, -(-d // 2 ** l)) for d in shape)].to(torch.float16).cpu().numpy()
            for l, (s, n) in enumerate(zip(sums, norms))]


def cache_pyramids(backbone, data_dir, case_ids, window, device, cache_dir=None, ram_gb=4.0):
    """{case id: list of (C_l, X_l, Y_l, Z_l) float16 arrays}. In memory, or (when the estimated
    size exceeds ram_gb) as memory-mapped .npy files in cache_dir, read back lazily."""
    per_voxel = 2 * sum(c / 8 ** l for l, c in enumerate(backbone.channels))      # bytes, float16
    voxels = sum(int(np.prod(load_case(data_dir, c)["image"].shape)) for c in case_ids)
    on_disk = per_voxel * voxels > ram_gb * 2 ** 30
    cache = {}
    for case_id in tqdm(case_ids, desc="cache pyramids", leave=False):
        levels = compute_pyramid(backbone, load_case(data_dir, case_id)["image"], window, device)
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
            a = np.asarray(cache[c][l], dtype=np.float64).reshape(len(cache[c][l]), -1)   # (C_l, V_l)
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
            a = a[(slice(None),) + tuple(slice(s // 2 ** l, (s + n) // 2 ** l) for s, n in zip(start, size))]
        out.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None].to(device))
    return out


# ----------------------------------------------------------------------------- training the head

def random_crop(shape, crop_size, m, rng):
    """(start, size) of an aligned crop of at most crop_size, or None if the volume fits whole."""
    if all(s <= c for s, c in zip(shape, crop_size)):
        return None
    size = [min(c // m * m, s // m * m) or s for s, c in zip(shape, crop_size)]
    start = [int(rng.integers(0, (s - n) // m + 1)) * m for s, n in zip(shape, size)]
    return start, size


def train_head(head, cache, labels, train_ids, cfg, device, seed=0, desc="probe"):
    """Adam on the head only, one training volume (or an aligned crop of it) per step, in a fixed
    shuffled order, until the mean loss of the last `plateau_window` steps improves by less than
    `plateau_tol` (relative) on the window before, or max_steps. Returns (steps, final mean loss)."""
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg["lr"])
    rng = np.random.default_rng(seed)
    m = 2 ** (len(head.convs) - 1)
    window, history, step, whole = cfg["plateau_window"], [], 0, {}
    bar = tqdm(total=cfg["max_steps"], desc=desc, leave=False, disable=world_info()[0] != 0)
    while step < cfg["max_steps"]:
        for case_id in rng.permutation(train_ids):
            label = labels[case_id]                                               # (X, Y, Z) uint8
            crop = random_crop(label.shape, cfg["crop_size"], m, rng)
            if crop is None:        # a whole volume: converted to float32 tensors once, not every step
                if case_id not in whole:
                    whole[case_id] = (as_tensors(cache[case_id], device),
                                      torch.from_numpy(np.asarray(label, dtype=np.int64))[None].to(device))
                pyramid, y = whole[case_id]                                       # y: (1, X, Y, Z)
            else:
                pyramid = as_tensors(cache[case_id], device, crop)
                label = label[tuple(slice(s, s + n) for s, n in zip(*crop))]
                y = torch.from_numpy(np.asarray(label, dtype=np.int64))[None].to(device)
            loss = segmentation_loss(head(pyramid), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(loss.item())
            step += 1
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{np.mean(history[-25:]):.4f}")
            if step >= 2 * window and step % window == 0:
                last, before = np.mean(history[-window:]), np.mean(history[-2 * window:-window])
                if before - last < cfg["plateau_tol"] * before:
                    bar.close()
                    return step, float(last)
            if step >= cfg["max_steps"]:
                break
    bar.close()
    return step, float(np.mean(history[-window:]))


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
    cfg, device, data_dir, test_dir, names, plan = setup(args, PAPER, DEMO, "linear", "linear_probe.py")
    if world_info()[1] > 1:
        raise SystemExit("linear_probe.py: error: the cached-feature probe runs in one process "
                         "(it trains a linear head only; torchrun gives it nothing)")
    work = tempfile.TemporaryDirectory(prefix="probe-cache-") if args.cache_dir is None else None
    cache_dir = Path(args.cache_dir or work.name)
    stats = {"head_training": {}}

    def read_labels(ids, folder):
        return {c: np.asarray(load_case(folder, c)["label"]) for c in ids}

    def train_fold(model, fold, train_ids):
        set_backbone_trainable(model, False)          # eval mode, no gradients: frozen for real
        backbone = model.backbone
        before = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        model.cache = cache_pyramids(backbone, data_dir, train_ids, cfg["eval_patch_size"], device,
                                     cache_dir / "train", args.cache_ram_gb)
        model.head.set_statistics(*channel_statistics(model.cache, train_ids))
        labels = read_labels(train_ids, data_dir)
        steps, loss = train_head(model.head, model.cache, labels, train_ids, cfg, device, args.seed + fold,
                                 desc=f"fold {fold}")
        stats["head_training"][str(fold)] = dict(steps=steps, final_loss=round(loss, 5))
        print(f"fold {fold}: head trained {steps} steps, final loss {loss:.4f}")
        # The check that only the head trained (MAE's probe left its encoder in train mode).
        assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())

    def evaluate_fold(model, fold, test_ids):
        folder = test_dir or data_dir
        cache = cache_pyramids(model.backbone, folder, test_ids, cfg["eval_patch_size"], device,
                               cache_dir / "test", args.cache_ram_gb)
        return evaluate_cached(model.head, cache, read_labels(test_ids, folder), test_ids, len(names), device)

    try:
        results = cross_validate(args, cfg, device, data_dir, test_dir, names, plan, "linear", train_fold,
                                 "linear probe", evaluate_fold, extra=stats)
    finally:
        if work is not None:
            work.cleanup()
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p)
    # The probe's own training (on cached pyramids)
    p.add_argument("--max-steps", type=int, help="cap on head-training steps (one volume each) [5000]")
    p.add_argument("--plateau-window", type=int, help="stop when the mean loss of this many steps ... [100]")
    p.add_argument("--plateau-tol", type=float, help="... improves by less than this fraction [0.005]")
    p.add_argument("--crop-size", type=int, nargs=3, help="largest region per step, full resolution [192 192 96]")
    p.add_argument("--cache-dir", help="memory-mapped pyramid cache for large data [a temporary folder]")
    p.add_argument("--cache-ram-gb", type=float, default=4.0, help="keep the cache in memory below this size")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
