"""Diagnostics for the evidence of what pretraining buys: does a backbone's voxel representation
say what tissue a voxel is, or where it sits in its crop? And how sure is a paired difference?

- view_offsets: how far the two views of a pretraining pair move against each other, per axis,
  relative to the patch (data.sample_pair's geometry on a full-body volume). A CNN with zero
  padding can match a positive pair by its position in the crop when the views barely move.
- shortcut_diagnostic: for one backbone, (i) positive-pair retrieval (is the nearest embedding
  among the other view's sampled voxels of the same pair, by cosine, the same voxel? chance is
  1 / num_voxels) at small vs large view offsets, split at the median; (ii) R^2 of a linear
  regression from the voxel features to the
  voxel's coordinates in its crop. R^2 is high for any CNN (a random FPN included), so only its
  change against random init says something; retrieval that holds only at small offsets is
  matching by position.
- matching_agreement: how often DenseCL's similarity matching (the most similar location in the
  other view) finds the geometric correspondent, for one backbone.
- paired_bootstrap: the mean of paired differences (pretrained - scratch, same cases, seeds and
  batches) with a percentile bootstrap 95% interval.
- the demo's classes (docs/demo.md): boundary_contrast, the mean intensity step across each
  organ's surface in units of the noise SD measured on the images (>= 2: boundaries are seen);
  intensity_only_dice, the best per-voxel intensity-only classifier (Bayes rule on the histogram,
  an upper bound): poor where context is needed (spleen vs liver, the two kidneys).

    python experiments/diagnostics.py --geometry                     # the offset statistic, demo
    vs paper
    python experiments/diagnostics.py --data demo --backbone runs/pretrain-demo --random-init
    python experiments/diagnostics.py --demo-classes data/demo       # the demo's classes, measured
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: the stage files
import runtime  # noqa: E402
from data import PairDataset, read_dataset, sample_pair  # noqa: E402
from model import FPN3d, sample_voxels  # noqa: E402
from runtime import positive_int  # noqa: E402
from weights import read_backbone  # noqa: E402

PAPER_GEOMETRY = dict(volume=(300, 250, 120), patch=(128, 128, 32))  # abdominal CT at 1 x 1 x 2 mm
DEMO_VOLUME = (52, 45, 20)  # a demo phantom at demo.DEMO_SCALE


def view_offsets(volume_shape, patch_size, pairs=2000, seed=0):
    """|start_b - start_a| / patch per axis for `pairs` crop pairs of a full-body volume ->
    (pairs, 3) float: 0 = the views coincide on that axis, 1 = they move by a whole patch."""
    body = np.ones(volume_shape, dtype=bool)
    image = np.zeros(volume_shape, dtype=np.float16)
    rng = np.random.default_rng(seed)
    out = np.empty((pairs, 3))
    for i in range(pairs):
        p = sample_pair(image, body, patch_size, 1, rng)
        out[i] = np.abs(p["start_b"] - p["start_a"]) / np.asarray(patch_size)
    return out


@torch.no_grad()
def voxel_features(backbone, patch, coords):
    """Every pyramid level read at the voxels (model.sample_voxels), concatenated.
    patch (X, Y, Z) array, coords (n, 3) -> (n, sum C_l) float32."""
    pyramid = backbone(torch.as_tensor(patch, dtype=torch.float32)[None, None])
    c = torch.as_tensor(coords, dtype=torch.int64)
    return torch.cat(
        sample_voxels(pyramid, torch.cat([torch.zeros(len(c), 1, dtype=torch.int64), c], 1)), 1
    )


def retrieval_accuracy(features_a, features_b):
    """Share of rows i whose most cosine-similar row of features_b is row i (both (n, D))."""
    a = torch.nn.functional.normalize(torch.as_tensor(features_a, dtype=torch.float32), dim=1)
    b = torch.nn.functional.normalize(torch.as_tensor(features_b, dtype=torch.float32), dim=1)
    return float((a @ b.T).argmax(1).eq(torch.arange(len(a))).float().mean())


def position_r2(features, coords, seed=0):
    """Held-out R^2 of a least-squares linear map (with intercept) from features (n, D) to
    coordinates (n, 3), averaged over the axes: fitted on a random half, scored on the other
    (in-sample R^2 of D-dimensional features on n rows would be inflated). ~1: the position is a
    linear function of the features; ~0 (or below): not at all."""
    x, y = np.asarray(features, np.float64), np.asarray(coords, np.float64)
    order = np.random.default_rng(seed).permutation(len(x))
    fit, test = order[: len(x) // 2], order[len(x) // 2 :]
    design = lambda rows: np.concatenate([x[rows], np.ones((len(rows), 1))], 1)
    weights, *_ = np.linalg.lstsq(design(fit), y[fit], rcond=None)
    residual = y[test] - design(test) @ weights
    total = y[test] - y[test].mean(0)
    return float(np.mean(1 - (residual**2).sum(0) / np.maximum((total**2).sum(0), 1e-12)))


def shortcut_diagnostic(
    backbone, data_dir, patch_size=(24, 24, 8), pairs=24, num_voxels=128, seed=123, case_ids=None
):
    """Retrieval at small / large view offsets (split at the median L1 offset, voxels) and the
    position R^2 of one backbone, on un-augmented pretraining pairs of data_dir (of case_ids
    only, if given). -> dict."""
    backbone.eval()
    dataset = PairDataset(
        data_dir, patch_size, num_voxels=num_voxels, length=pairs, seed=seed, case_ids=case_ids
    )
    offsets, accuracy, feats, coords = [], [], [], []
    for i in range(pairs):
        pair = dataset[i][0]
        fa = voxel_features(backbone, pair["patch_a"], pair["coords_a"])
        fb = voxel_features(backbone, pair["patch_b"], pair["coords_b"])
        offsets.append(int(np.abs(pair["coords_b"][0] - pair["coords_a"][0]).sum()))
        accuracy.append(retrieval_accuracy(fa, fb))
        feats.append(fa.numpy())
        coords.append(pair["coords_a"])
    offsets, accuracy = np.asarray(offsets), np.asarray(accuracy)
    split = np.median(offsets)
    small, large = offsets <= split, offsets > split
    return dict(
        median_offset=float(split),
        pairs=pairs,
        retrieval_small_offset=float(accuracy[small].mean()) if small.any() else float("nan"),
        retrieval_large_offset=float(accuracy[large].mean()) if large.any() else float("nan"),
        r2=position_r2(np.concatenate(feats), np.concatenate(coords), seed),
    )


def matching_agreement(backbone, data_dir, level, pairs=64, patch_size=(32, 32, 16), seed=123):
    """How often DenseCL's similarity matching agrees with geometry, for one backbone: over
    un-augmented overlapping crop pairs (data.PairDataset), the fraction of view-A locations of
    FPN level `level` whose most similar view-B location (densecl.dense_matches on the backbone's
    features) is the geometrically corresponding one or its neighbour (Chebyshev distance <= 1
    cell), among the A locations whose correspondent lies inside B."""
    from experiments.neighbours.densecl import dense_matches

    dataset = PairDataset(data_dir, patch_size, num_voxels=16, length=pairs, seed=seed)
    hits = total = 0
    backbone.eval()
    cell = 2**level
    for i in range(pairs):
        pair = dataset[i][0]
        offset = torch.from_numpy(
            pair["coords_b"][0] - pair["coords_a"][0]
        )  # A voxel c is B voxel c + offset
        with torch.no_grad():
            fa, fb = (
                backbone(torch.from_numpy(pair[f"patch_{v}"])[None, None].float())[level]
                for v in "ab"
            )
        match = dense_matches(fa.flatten(2), fb.flatten(2))[0]  # (S_a,)
        dims_a, dims_b = torch.tensor(fa.shape[2:]), torch.tensor(fb.shape[2:])
        grid = torch.stack(
            torch.meshgrid(*[torch.arange(int(d)) for d in dims_a], indexing="ij"), -1
        ).reshape(-1, 3)
        expected = torch.div(
            grid * cell + cell // 2 + offset, cell, rounding_mode="floor"
        )  # (S_a, 3) B cells
        inside = ((expected >= 0) & (expected < dims_b)).all(1)
        got = torch.stack(
            [match // (dims_b[1] * dims_b[2]), match // dims_b[2] % dims_b[1], match % dims_b[2]], 1
        )
        hits += int((((got - expected).abs().max(1).values <= 1) & inside).sum())
        total += int(inside.sum())
    return hits / max(total, 1)


def paired_bootstrap(differences, n_boot=10_000, seed=0, level=0.95):
    """Mean of paired differences and its percentile bootstrap interval: resample the pairs with
    replacement n_boot times. -> (mean, (low, high))."""
    d = np.asarray(differences, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    tail = (1 - level) / 2 * 100
    return float(d.mean()), (
        float(np.percentile(means, tail)),
        float(np.percentile(means, 100 - tail)),
    )


def intensity_only_dice(data_dir, num_bins=1000):
    """Dice per class of the best intensity-only classifier -> {class name: dice}.

    Bayes rule on a fine histogram: every intensity bin predicts its majority class over all
    body voxels of all labelled cases (fitted and scored on the same voxels: an upper bound).
    """
    info = read_dataset(data_dir)[1]
    names = info["labels"]
    k = max(int(c) for c in names) + 1
    counts = np.zeros((num_bins, k), np.int64)  # (bins, classes)
    for case in (c for c in info["cases"] if c["labelled"]):
        folder = Path(data_dir) / "cases" / case["id"]
        body = np.load(folder / "body.npy")
        bins = np.minimum(
            (np.load(folder / "image.npy")[body] * num_bins).astype(np.int64), num_bins - 1
        )
        counts += np.bincount(
            bins * k + np.load(folder / "label.npy")[body], minlength=num_bins * k
        ).reshape(num_bins, k)
    predicted = counts.argmax(axis=1)  # (bins,)
    dice = {}
    for c in range(1, k):
        overlap, size = counts[predicted == c, c].sum(), counts[predicted == c].sum()
        total = size + counts[:, c].sum()
        dice[names[str(c)]] = float(2 * overlap / total) if total else float("nan")
    return dice


def boundary_contrast(data_dir, shell=2):
    """Visibility of each organ's boundary -> ({class name: step / noise SD}, noise SD in HU).

    Step: mean HU inside the organ minus mean HU in a `shell`-voxel shell just outside it (a
    dilation of the mask minus the mask), averaged over the labelled cases where the organ is
    present. Noise SD: robust (median absolute deviation) SD of the air voxels of the cropped
    volumes (outside body.npy), i.e. measured on the preprocessed images, not assumed."""
    info = read_dataset(data_dir)[1]
    names, lo, hi = info["labels"], *info["preset"]["clip"]
    steps, air = {}, []
    for case in (c for c in info["cases"] if c["labelled"]):
        folder = Path(data_dir) / "cases" / case["id"]
        image = np.load(folder / "image.npy").astype(np.float32) * (hi - lo) + lo  # (X, Y, Z) HU
        label, body = np.load(folder / "label.npy"), np.load(folder / "body.npy")
        outside = image[~body & (image < -900)]
        air.append(outside - np.median(outside))
        for c in range(1, len(names)):
            mask = label == c
            if mask.any():
                ring = ndimage.binary_dilation(mask, iterations=shell) & ~mask
                steps.setdefault(names[str(c)], []).append(
                    abs(image[mask].mean() - image[ring].mean())
                )
    noise_sd = 1.4826 * float(np.median(np.abs(np.concatenate(air))))
    return {n: float(np.mean(v)) / noise_sd for n, v in steps.items()}, noise_sd


def main(args):
    if args.geometry:
        from pretrain import DEMO

        for name, g in (
            ("demo", dict(volume=DEMO_VOLUME, patch=tuple(DEMO["patch_size"]))),
            ("paper", PAPER_GEOMETRY),
        ):
            o = view_offsets(g["volume"], g["patch"], args.pairs)
            print(
                f"{name:<6} volume {g['volume']}, patch {g['patch']}: median |view offset| / patch "
                f"per axis {np.round(np.median(o, 0), 3).tolist()}, mean "
                f"{np.round(o.mean(0), 3).tolist()}"
            )
        return
    if args.demo_classes:
        data_dir = read_dataset(args.demo_classes)[0]
        contrast, noise_sd = boundary_contrast(data_dir)
        print(f"{'class':<14} {'boundary step / noise SD':>25} {'intensity-only Dice':>20}")
        for name, dice in intensity_only_dice(data_dir).items():
            print(f"  {name:<14} {contrast[name]:>23.1f} {dice:>20.3f}")
        print(
            f"(noise SD measured in the air around the body: {noise_sd:.1f} HU; a step >= 2 is a "
            "visible boundary; intensity-only Dice < 1 where context is needed)"
        )
        return
    data_dir = read_dataset(args.data)[0]
    config, state, _ = read_backbone(args.backbone, verbose=False)
    nets = {"pretrained": FPN3d(**config)}
    nets["pretrained"].load_state_dict(state)
    if args.random_init:
        torch.manual_seed(0)
        nets["random init"] = FPN3d(**config)
    for name, net in nets.items():
        print(name, shortcut_diagnostic(net, data_dir, tuple(args.patch_size), args.pairs))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--geometry",
        action="store_true",
        help="the view-offset statistic for the demo and paper geometry",
    )
    p.add_argument(
        "--demo-classes",
        metavar="DATA_DIR",
        help="the demo's classes: boundary contrast, intensity-only Dice",
    )
    p.add_argument("--data", default="demo")
    p.add_argument(
        "--backbone", help="a pretrain.py run folder or its backbone.pt (or the authors' weights)"
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="also a random FPN of the same size, for comparison",
    )
    p.add_argument(
        "--patch-size",
        type=positive_int,
        nargs=3,
        default=(24, 24, 8),
        help="the pretraining patch",
    )
    p.add_argument("--pairs", type=positive_int, default=24)
    return runtime.parse(
        p,
        argv,
        refusals=lambda a: [
            "give --backbone, --geometry or --demo-classes"
            if not (a.geometry or a.demo_classes or a.backbone)
            else None
        ],
    )


if __name__ == "__main__":
    runtime.cli(main, parse_args)
