"""Diagnostics for the evidence of what pretraining buys: does a backbone's voxel representation
say what tissue a voxel is, or where it sits in its crop? And how sure is a paired difference?

- view_offsets: how far the two views of a pretraining pair move against each other, per axis,
  relative to the patch (data.sample_pair's geometry on a full-body volume). A CNN with zero
  padding can match a positive pair by its position in the crop when the views barely move.
- shortcut_diagnostic: for one backbone, (i) positive-pair retrieval (is the nearest embedding
  among the other view's sampled voxels of the same pair, by cosine, the same voxel? chance is
  1 / num_voxels) at small vs large view offsets, split at the median; (ii) R^2 of a linear regression from the voxel features to the
  voxel's coordinates in its crop. R^2 is high for any CNN (a random FPN included), so only its
  change against random init says something; retrieval that holds only at small offsets is
  matching by position.
- matching_agreement: how often DenseCL's similarity matching (the most similar location in the
  other view) finds the geometric correspondent, for one backbone.
- paired_bootstrap: the mean of paired differences (pretrained - scratch, same cases, seeds and
  batches) with a percentile bootstrap 95% interval.

    python experiments/diagnostics.py --geometry                     # the offset statistic, demo vs paper
    python experiments/diagnostics.py --data demo --backbone runs/pretrain-demo --random-init
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository: the stage files
from data import PairDataset, sample_pair  # noqa: E402
from model import sample_voxels  # noqa: E402
from runtime import positive_int  # noqa: E402

PAPER_GEOMETRY = dict(volume=(300, 250, 120), patch=(128, 128, 32))   # abdominal CT at 1 x 1 x 2 mm
DEMO_VOLUME = (52, 45, 20)                                             # a demo phantom at demo.DEMO_SCALE


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
    return torch.cat(sample_voxels(pyramid, torch.cat([torch.zeros(len(c), 1, dtype=torch.int64), c], 1)), 1)


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
    fit, test = order[: len(x) // 2], order[len(x) // 2:]
    design = lambda rows: np.concatenate([x[rows], np.ones((len(rows), 1))], 1)
    weights, *_ = np.linalg.lstsq(design(fit), y[fit], rcond=None)
    residual = y[test] - design(test) @ weights
    total = y[test] - y[test].mean(0)
    return float(np.mean(1 - (residual ** 2).sum(0) / np.maximum((total ** 2).sum(0), 1e-12)))


def shortcut_diagnostic(backbone, data_dir, patch_size=(24, 24, 8), pairs=24, num_voxels=128, seed=123, case_ids=None):
    """Retrieval at small / large view offsets (split at the median L1 offset, voxels) and the
    position R^2 of one backbone, on un-augmented pretraining pairs of data_dir (of case_ids
    only, if given). -> dict."""
    backbone.eval()
    dataset = PairDataset(data_dir, patch_size, num_voxels=num_voxels, length=pairs, seed=seed, case_ids=case_ids)
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
    return dict(median_offset=float(split), pairs=pairs,
                retrieval_small_offset=float(accuracy[small].mean()) if small.any() else float("nan"),
                retrieval_large_offset=float(accuracy[large].mean()) if large.any() else float("nan"),
                r2=position_r2(np.concatenate(feats), np.concatenate(coords), seed))


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
    cell = 2 ** level
    for i in range(pairs):
        pair = dataset[i][0]
        offset = torch.from_numpy(pair["coords_b"][0] - pair["coords_a"][0])      # A voxel c is B voxel c + offset
        with torch.no_grad():
            fa, fb = (backbone(torch.from_numpy(pair[f"patch_{v}"])[None, None].float())[level] for v in "ab")
        match = dense_matches(fa.flatten(2), fb.flatten(2))[0]                    # (S_a,)
        dims_a, dims_b = torch.tensor(fa.shape[2:]), torch.tensor(fb.shape[2:])
        grid = torch.stack(torch.meshgrid(*[torch.arange(int(d)) for d in dims_a], indexing="ij"), -1).reshape(-1, 3)
        expected = torch.div(grid * cell + cell // 2 + offset, cell, rounding_mode="floor")   # (S_a, 3) B cells
        inside = ((expected >= 0) & (expected < dims_b)).all(1)
        got = torch.stack([match // (dims_b[1] * dims_b[2]), match // dims_b[2] % dims_b[1], match % dims_b[2]], 1)
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
    return float(d.mean()), (float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))


def main(args):
    if args.geometry:
        from pretrain import DEMO
        for name, g in (("demo", dict(volume=DEMO_VOLUME, patch=tuple(DEMO["patch_size"]))), ("paper", PAPER_GEOMETRY)):
            o = view_offsets(g["volume"], g["patch"], args.pairs)
            print(f"{name:<6} volume {g['volume']}, patch {g['patch']}: median |view offset| / patch per axis "
                  f"{np.round(np.median(o, 0), 3).tolist()}, mean {np.round(o.mean(0), 3).tolist()}")
        return
    from downstream import read_backbone_file
    from model import FPN3d
    from preprocess import resolve_data_dir
    data_dir = resolve_data_dir(args.data)
    config, state, _ = read_backbone_file(args.backbone, verbose=False)
    nets = {"pretrained": FPN3d(**config)}
    nets["pretrained"].load_state_dict(state)
    if args.random_init:
        torch.manual_seed(0)
        nets["random init"] = FPN3d(**config)
    for name, net in nets.items():
        print(name, shortcut_diagnostic(net, data_dir, tuple(args.patch_size), args.pairs))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--geometry", action="store_true", help="the view-offset statistic for the demo and paper geometry")
    p.add_argument("--data", default="demo")
    p.add_argument("--backbone", help="a pretrain.py run folder or its backbone.pt (or the authors' weights)")
    p.add_argument("--random-init", action="store_true", help="also a random FPN of the same size, for comparison")
    p.add_argument("--patch-size", type=positive_int, nargs=3, default=(24, 24, 8), help="the pretraining patch")
    p.add_argument("--pairs", type=positive_int, default=24)
    args = p.parse_args(argv)
    if not args.geometry and not args.backbone:
        p.error("give --backbone (or --geometry)")
    return args


if __name__ == "__main__":
    main(parse_args())
