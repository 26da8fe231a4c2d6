"""experiments/diagnostics.py: the shortcut diagnostic on features whose answer is known (coordinates:
R^2 ~ 1; random numbers: ~ 0; identical views: retrieval 1), the view-offset statistic on
geometries whose answer is known, and the paired bootstrap against a numpy computation."""
import numpy as np
import torch

from experiments import diagnostics
from model import FPN3d


def test_position_r2_on_coordinates_and_on_noise():
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 32, (3000, 3))
    features = np.concatenate([coords * 0.7 + 3, rng.normal(size=(3000, 20))], 1)   # position plus noise channels
    assert diagnostics.position_r2(features, coords) > 0.99
    assert diagnostics.position_r2(rng.normal(size=(3000, 40)), coords) < 0.05


def test_retrieval_on_identical_and_on_random_views():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(200, 16))
    assert diagnostics.retrieval_accuracy(f, f * 3.0) == 1.0          # the same voxel, another scale
    assert diagnostics.retrieval_accuracy(f, rng.normal(size=(200, 16))) < 0.05


def test_view_offsets_by_geometry():
    same = diagnostics.view_offsets((32, 32, 16), (32, 32, 16), pairs=50)
    assert np.all(same == 0)                                          # the patch is the volume: no offset
    big = diagnostics.view_offsets((300, 250, 120), (128, 128, 32), pairs=500)
    assert np.all(big <= 1) and np.all(np.median(big, 0) > 0.05)


def test_paired_bootstrap_matches_numpy():
    d = np.array([0.05, -0.02, 0.08, 0.01, 0.04, 0.03])
    mean, (low, high) = diagnostics.paired_bootstrap(d, n_boot=2000, seed=3)
    rng = np.random.default_rng(3)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(2000)])
    assert mean == d.mean()
    assert np.isclose(low, np.percentile(means, 2.5)) and np.isclose(high, np.percentile(means, 97.5))
    assert low < mean < high


def test_shortcut_diagnostic_runs_on_a_backbone(small_demo):
    torch.manual_seed(0)
    net = FPN3d(in_channels=1, base_channels=4, num_levels=3)
    out = diagnostics.shortcut_diagnostic(net, small_demo, patch_size=(16, 16, 8), pairs=6, num_voxels=32)
    assert set(out) == {"median_offset", "pairs", "retrieval_small_offset", "retrieval_large_offset", "r2"}
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
        codes = torch.cos(x * self.freqs[:, None, None, None] + self.phases[:, None, None, None])   # (B, 256, X, Y, Z)
        cells = torch.nn.functional.avg_pool3d(codes, 4)
        return [None, None, torch.randn_like(cells) if self.random else cells]


def test_matching_agreement_on_shared_voxels_and_on_random_features(tmp_path):
    """matching_agreement's bookkeeping (offsets, cell centres, flat indices) on features
    whose answer is known: when a cell's feature says which voxels it holds, the most similar B cell
    is the one sharing most voxels, the geometric correspondent (agreement ~1); random features
    agree by chance only (~ the share of B cells within one cell of the correspondent)."""
    from test_data import write_case, write_dataset
    shape = (40, 40, 16)
    image = np.random.default_rng(0).random(shape).astype(np.float32)     # distinct intensities
    write_dataset(tmp_path, [write_case(tmp_path, "noise", image, np.ones(shape, bool))])
    torch.manual_seed(0)
    geometric = diagnostics.matching_agreement(_PooledVoxelCodes(False), tmp_path, 2, pairs=8, patch_size=(24, 24, 8))
    chance = diagnostics.matching_agreement(_PooledVoxelCodes(True), tmp_path, 2, pairs=8, patch_size=(24, 24, 8))
    assert geometric > 0.95 and chance < 0.6
