"""experiments/diagnostics.py: the shortcut diagnostic on features whose answer is known
(coordinates:
R^2 ~ 1; random numbers: ~ 0; identical views: retrieval 1), the view-offset statistic on
geometries whose answer is known, and the paired bootstrap against a numpy computation."""

import json

import numpy as np
import pytest
import torch

import demo
import preprocess
from experiments import diagnostics
from model import FPN3d


def test_position_r2_on_coordinates_and_on_noise():
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 32, (3000, 3))
    features = np.concatenate(
        [coords * 0.7 + 3, rng.normal(size=(3000, 20))], 1
    )  # position plus noise channels
    assert diagnostics.position_r2(features, coords) > 0.99
    assert diagnostics.position_r2(rng.normal(size=(3000, 40)), coords) < 0.05


def test_retrieval_on_identical_and_on_random_views():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(200, 16))
    assert diagnostics.retrieval_accuracy(f, f * 3.0) == 1.0  # the same voxel, another scale
    assert diagnostics.retrieval_accuracy(f, rng.normal(size=(200, 16))) < 0.05


def test_view_offsets_by_geometry():
    same = diagnostics.view_offsets((32, 32, 16), (32, 32, 16), pairs=50)
    assert np.all(same == 0)  # the patch is the volume: no offset
    big = diagnostics.view_offsets((300, 250, 120), (128, 128, 32), pairs=500)
    assert np.all(big <= 1) and np.all(np.median(big, 0) > 0.05)


def test_paired_bootstrap_matches_numpy():
    d = np.array([0.05, -0.02, 0.08, 0.01, 0.04, 0.03])
    mean, (low, high) = diagnostics.paired_bootstrap(d, n_boot=2000, seed=3)
    rng = np.random.default_rng(3)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(2000)])
    assert mean == d.mean()
    assert np.isclose(low, np.percentile(means, 2.5)) and np.isclose(
        high, np.percentile(means, 97.5)
    )
    assert low < mean < high


def test_shortcut_diagnostic_runs_on_a_backbone(small_demo):
    torch.manual_seed(0)
    net = FPN3d(in_channels=1, base_channels=4, num_levels=3)
    out = diagnostics.shortcut_diagnostic(
        net, small_demo, patch_size=(16, 16, 8), pairs=6, num_voxels=32
    )
    assert set(out) == {
        "median_offset",
        "pairs",
        "retrieval_small_offset",
        "retrieval_large_offset",
        "r2",
    }
    assert 0 <= out["retrieval_small_offset"] <= 1 and out["r2"] <= 1


class _PooledVoxelCodes(torch.nn.Module):
    """A stand-in backbone: every intensity gets a 256-channel random Fourier code (two voxels of
    different intensity: nearly orthogonal codes), averaged over each 4 x 4 x 4 cell for level 2,
    so two cells' cosine grows with the voxels they share; or random numbers of the same shape."""

    def __init__(self, random):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.random = random
        self.freqs = torch.rand(256, generator=g) * 2000
        self.phases = torch.rand(256, generator=g) * 6.3

    def forward(self, x):
        codes = torch.cos(
            x * self.freqs[:, None, None, None] + self.phases[:, None, None, None]
        )  # (B, 256, X, Y, Z)
        cells = torch.nn.functional.avg_pool3d(codes, 4)
        return [None, None, torch.randn_like(cells) if self.random else cells]


def test_matching_agreement_on_shared_voxels_and_on_random_features(tmp_path):
    """matching_agreement's bookkeeping (offsets, cell centres, flat indices) on features
    whose answer is known: when a cell's feature says which voxels it holds, the most similar B cell
    is the one sharing most voxels, the geometric correspondent (agreement ~1); random features
    agree by chance only (~ the share of B cells within one cell of the correspondent)."""
    shape = (40, 40, 16)
    image = np.random.default_rng(0).random(shape).astype(np.float32)  # distinct intensities
    case = tmp_path / "cases" / "noise"
    case.mkdir(parents=True)
    np.save(case / "image.npy", image)
    np.save(case / "body.npy", np.ones(shape, bool))
    (case / "meta.json").write_text(json.dumps(dict(format_version=1, case_id="noise")))
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            dict(
                format_version=1,
                labels=None,
                cases=[dict(id="noise", split="unlabelled", labelled=False, shape=list(shape))],
            )
        )
    )
    torch.manual_seed(0)
    geometric = diagnostics.matching_agreement(
        _PooledVoxelCodes(False), tmp_path, 2, pairs=8, patch_size=(24, 24, 8)
    )
    chance = diagnostics.matching_agreement(
        _PooledVoxelCodes(True), tmp_path, 2, pairs=8, patch_size=(24, 24, 8)
    )
    assert geometric > 0.95 and chance < 0.6


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    """Three demo phantoms at twice the demo scale (organs of realistic voxel size)."""
    return preprocess.build_demo(
        tmp_path_factory.mktemp("demo"), num_cases=3, unlabelled_cases=0, seed=1, scale=0.6
    )


def test_intensity_only_dice_needs_context(demo_set):
    scores = diagnostics.intensity_only_dice(demo_set)
    print({k: round(v, 3) for k, v in scores.items()})
    assert set(scores) == set(demo.DEMO_LABELS[1:])
    assert scores["kidney_left"] < 0.9 and scores["kidney_right"] < 0.9  # identical intensities


def test_intensity_only_dice_matches_naive(tmp_path):
    rng = np.random.default_rng(9)
    cases = []
    for i in range(2):
        folder = tmp_path / "cases" / f"c{i}"
        folder.mkdir(parents=True)
        label = rng.integers(0, 3, (6, 5, 4)).astype(np.uint8)
        image = np.clip(0.2 * label + rng.normal(0, 0.15, label.shape), 0, 1).astype(np.float16)
        body = rng.random(label.shape) > 0.2
        for name, array in (("image", image), ("body", body), ("label", label)):
            np.save(folder / f"{name}.npy", array)
        cases.append(dict(id=f"c{i}", split="train", labelled=True, shape=list(label.shape)))
    cases.append(dict(id="u", split="unlabelled", labelled=False, shape=[1, 1, 1]))
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            dict(format_version=1, labels={"0": "background", "1": "a", "2": "b"}, cases=cases)
        )
    )
    num_bins = 10
    counts = {}  # naive: (bin, class) -> voxel count over all body voxels of both cases
    for case in cases[:2]:
        folder = tmp_path / "cases" / case["id"]
        image, body, label = (np.load(folder / f"{n}.npy") for n in ("image", "body", "label"))
        for v in zip(*np.nonzero(body)):
            key = (min(int(float(image[v]) * num_bins), num_bins - 1), int(label[v]))
            counts[key] = counts.get(key, 0) + 1
    majority = {
        b: max(range(3), key=lambda c: (counts.get((b, c), 0), -c)) for b in range(num_bins)
    }
    expected = {}
    for c, name in ((1, "a"), (2, "b")):
        tp = sum(n for (b, k), n in counts.items() if k == c and majority[b] == c)
        pred = sum(n for (b, k), n in counts.items() if majority[b] == c)
        true = sum(n for (b, k), n in counts.items() if k == c)
        expected[name] = 2 * tp / (pred + true)
    assert diagnostics.intensity_only_dice(tmp_path, num_bins=num_bins) == pytest.approx(expected)


def test_demo_boundaries_are_visible_and_identity_needs_context(demo_set):
    """Issue: every organ's boundary step >= 2 noise SD; the intensity-only classifier is poor
    for the look-alike pairs (liver vs spleen, the two kidneys)."""
    contrast, noise_sd = diagnostics.boundary_contrast(demo_set)
    assert 3 < noise_sd < 20  # HU, measured (raw noise: demo.NOISE_HU)
    assert min(contrast.values()) >= 2, contrast
    dice = diagnostics.intensity_only_dice(demo_set)
    assert dice["spleen"] < 0.3 and min(dice["kidney_left"], dice["kidney_right"]) < 0.3, dice
