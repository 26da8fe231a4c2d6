"""augment.py: generic contract of every augmentation, then each one against a reference
(the cell layout for shuffling, the box mask for in-painting, a 100,000-point Bezier + np.interp
as Models Genesis for the intensity curve, np.interp for the lookup tables, scipy for the blur),
and meta tensors to show that no function reads a value back from the device."""

import os
import sys
from math import comb

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter1d

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augment  # noqa: E402

SHAPE = (2, 1, 24, 24, 8)  # (B, C, X, Y, Z)
SMALL_BLOCKS = dict(num_blocks=30, block_fraction=(1 / 6, 1 / 6, 1 / 4))  # 4x4x2 cells on SHAPE


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_batch(shape=SHAPE, seed=123, dtype=torch.float32):
    return torch.rand(shape, generator=gen(seed), dtype=dtype)


AUGMENTATIONS = {
    "shuffle": lambda x, g: augment.local_pixel_shuffle(x, g, prob=1.0, **SMALL_BLOCKS),
    "inpaint": lambda x, g: augment.local_inpaint(x, g),
    "bezier": lambda x, g: augment.bezier_intensity(x, g, prob=1.0),
    "blur_or_sharpen": lambda x, g: augment.blur_or_sharpen(x, g, prob=1.0),
    "noise": lambda x, g: augment.gaussian_noise(x, g, prob=1.0),
    "window": lambda x, g: augment.random_window(x, g, prob=1.0),
    "local": lambda x, g: augment.augment_batch(x, g, "local"),
    "vox2vec": lambda x, g: augment.augment_batch(x, g, "vox2vec"),
}


@pytest.mark.parametrize("name", AUGMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract(name, dtype):
    fn = AUGMENTATIONS[name]
    x = random_batch(dtype=dtype)
    x_before = x.clone()
    out = fn(x, gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(x, x_before), "input modified"
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, fn(x, gen(0))), "same seed, different output"
    assert not torch.equal(out, fn(x, gen(1))), "different seed, same output"
    assert not torch.equal(out, x)


def test_rejects_non_batch_input_and_unknown_kind():
    with pytest.raises(ValueError, match="augment.py"):
        augment.local_inpaint(torch.rand(24, 24, 8), gen(0))
    with pytest.raises(ValueError, match="augment.py"):
        augment.augment_batch(random_batch(), gen(0), kind="genesis")


def test_prob_zero_leaves_input_unchanged():
    x = random_batch()
    assert torch.equal(augment.local_pixel_shuffle(x, gen(0), prob=0.0, **SMALL_BLOCKS), x)
    assert torch.equal(augment.bezier_intensity(x, gen(0), prob=0.0), x)
    assert torch.equal(augment.blur_or_sharpen(x, gen(0), prob=0.0), x)
    assert torch.equal(augment.gaussian_noise(x, gen(0), prob=0.0), x)
    assert torch.equal(augment.random_window(x, gen(0), prob=0.0), x)
    none = augment.augment_batch(x, gen(0), kind="none")
    assert torch.equal(none, x) and none.data_ptr() != x.data_ptr()


# ----------------------------------------------------------------------------- shuffling
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffle_only_permutes_within_cells(seed):
    B, C, X, Y, Z = SHAPE
    values = torch.randperm(B * X * Y * Z, generator=gen(99)).double() / (B * X * Y * Z)
    x = values.reshape(SHAPE)  # every voxel value unique
    out, cell = augment.local_pixel_shuffle(
        x, gen(seed), prob=1.0, return_cells=True, **SMALL_BLOCKS
    )
    assert torch.equal(out, augment.local_pixel_shuffle(x, gen(seed), prob=1.0, **SMALL_BLOCKS))
    assert cell.shape == (B, X, Y, Z)
    still = cell == -1
    assert torch.equal(out[:, 0][still], x[:, 0][still]), "a voxel outside the shuffled cells moved"
    for b in range(B):
        ids = cell[b].unique()
        ids = ids[ids >= 0]
        assert len(ids) == SMALL_BLOCKS["num_blocks"]
        for c in ids:
            where = (cell[b] == c).nonzero()  # (V, 3)
            extent = (where.max(0).values - where.min(0).values + 1).tolist()
            assert extent == [4, 4, 2] and len(where) == 32, "a cell is not one 4x4x2 block"
            inside = cell[b] == c
            assert torch.equal(out[b, 0][inside].sort().values, x[b, 0][inside].sort().values)
    moved = (out != x).double().mean().item()
    assert moved > 0.5 * (30 * 32) / (X * Y * Z), "too few voxels moved"


def test_shuffle_grid_offset_is_per_patch():
    B, C, X, Y, Z = 8, 1, 24, 24, 8
    x = torch.rand((B, C, X, Y, Z), generator=gen(4))
    _, cell = augment.local_pixel_shuffle(
        x,
        gen(0),
        prob=1.0,
        num_blocks=10_000,
        block_fraction=(1 / 6, 1 / 6, 1 / 4),
        return_cells=True,
    )
    # All 5x5x3 cells of 4x4x2 shuffled: the covered voxels are one 20x20x6 box at the grid's
    # offset,
    # which leaves 24 - 20 = 4 (x, y) and 8 - 6 = 2 (z) voxels of slack.
    origins = []
    for b in range(B):
        where = (cell[b] >= 0).nonzero()  # (V, 3)
        origin = where.min(0).values
        assert (origin <= torch.tensor([4, 4, 2])).all()
        box = torch.zeros(X, Y, Z, dtype=torch.bool)
        box[origin[0] : origin[0] + 20, origin[1] : origin[1] + 20, origin[2] : origin[2] + 6] = (
            True
        )
        assert torch.equal(cell[b] >= 0, box)
        origins.append(tuple(origin.tolist()))
    assert len(set(origins)) > 1, "all patches share one grid offset"


def test_no_host_device_sync():
    """Meta tensors hold no data, so any read back to the host (.item(), .tolist(), nonzero, a
    boolean mask, an `if` on a value) raises: passing means the pipelines never wait for the
    device."""
    x = torch.empty(SHAPE, device="meta")
    for kind in augment.KINDS:
        out = augment.augment_batch(x, None, kind)  # None: the (meta) default generator
        assert out.shape == x.shape and out.device.type == "meta"
    out, cell = augment.local_pixel_shuffle(x, None, return_cells=True)
    assert cell.shape == (SHAPE[0], *SHAPE[2:]) and cell.device.type == "meta"


def test_shuffle_cell_count_capped_by_grid():
    x = random_batch()
    _, cell = augment.local_pixel_shuffle(
        x,
        gen(0),
        prob=1.0,
        num_blocks=10_000,
        block_fraction=(1 / 6, 1 / 6, 1 / 4),
        return_cells=True,
    )
    # 24 = 4 + 5*4 fits 5 cells at any offset in [0, 4]; 8 = 2 + 3*2 fits 3: 75 cells per sample
    assert [len(cell[b].unique()) - int((cell[b] == -1).any()) for b in range(SHAPE[0])] == [75, 75]


# ----------------------------------------------------------------------------- in-painting
def test_inpaint_changes_only_its_boxes():
    x = random_batch()
    mask = augment.inpaint_mask(x.shape, gen(5), num_boxes=15)
    out = augment.local_inpaint(x, gen(5), num_boxes=15)
    assert mask.shape == (SHAPE[0], 1, *SHAPE[2:]) and mask.dtype == torch.bool
    assert 0 < mask.float().mean() < 1
    assert torch.equal(out[~mask.expand_as(x)], x[~mask.expand_as(x)])
    inside = out[mask.expand_as(x)]
    assert (inside != x[mask.expand_as(x)]).all() and inside.min() >= 0 and inside.max() < 1


@pytest.mark.parametrize("seed", range(5))
def test_inpaint_single_box_is_a_box_of_allowed_size(seed):
    shape = (3, 1, 40, 30, 20)
    mask = augment.inpaint_mask(shape, gen(seed), num_boxes=1)[:, 0]
    # sides as randint(d // 10, d // 5): X 4..7, Y 3..5, Z 2..3
    for b in range(shape[0]):
        where = mask[b].nonzero()
        extent = (where.max(0).values - where.min(0).values + 1).tolist()
        assert len(where) == np.prod(extent), "mask is not one box"
        assert 4 <= extent[0] <= 7 and 3 <= extent[1] <= 5 and 2 <= extent[2] <= 3


# ----------------------------------------------------------------------------- Bezier intensity
def models_genesis_interp(points, values, num_points=100_000):
    """The reference algorithm: sample the Bezier curve densely, sort x and y, np.interp."""
    control = [[0, 0], [points[0], points[1]], [points[2], points[3]], [1, 1]]
    t = np.linspace(0.0, 1.0, num_points)
    polynomials = np.array([comb(3, i) * t ** (3 - i) * (1 - t) ** i for i in range(4)])
    xvals = np.dot([p[0] for p in control], polynomials)
    yvals = np.dot([p[1] for p in control], polynomials)
    return np.interp(values, np.sort(xvals), np.sort(yvals))


def test_bezier_lut_matches_dense_reference():
    points = torch.rand(20, 4, generator=gen(7), dtype=torch.float64)
    values = torch.rand(20, 500, generator=gen(8), dtype=torch.float64)
    values[:, :3] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    ours = augment.apply_lut(values, augment.bezier_lut(points)).numpy()
    for b in range(len(points)):
        reference = models_genesis_interp(points[b].numpy(), values[b].numpy())
        np.testing.assert_allclose(ours[b], reference, atol=2e-4)


def test_interp_knots_equals_np_interp():
    xs, ys = augment.bezier_curve(torch.rand(4, 4, generator=gen(9)), num_points=64)
    values = torch.cat([torch.rand(4, 300, generator=gen(10)), xs], dim=1)  # include the knots
    ours = augment.interp_knots(values, xs, ys).numpy()
    for b in range(4):
        reference = np.interp(
            values[b].double().numpy(), xs[b].double().numpy(), ys[b].double().numpy()
        )
        np.testing.assert_allclose(ours[b], reference, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_lut_equals_np_interp_on_uniform_grid(dtype):
    B, T = 5, 37
    lut = torch.rand(B, T, generator=gen(11), dtype=dtype).sort(1).values  # (B, T) non-decreasing
    grid = torch.linspace(0, 1, T, dtype=torch.float64)
    values = torch.cat(
        [
            torch.rand(B, 400, generator=gen(12), dtype=dtype) * 1.2 - 0.1,  # some outside [0, 1]
            grid.to(dtype).expand(B, T),
        ],
        dim=1,
    )  # and the grid points themselves
    ours = augment.apply_lut(values, lut)
    assert ours.dtype == dtype
    for b in range(B):
        reference = np.interp(values[b].double().numpy(), grid.numpy(), lut[b].double().numpy())
        np.testing.assert_allclose(ours[b].double().numpy(), reference, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_lut_exactly_monotone_at_cell_edges(dtype):
    B, T = 50, 9
    lut = torch.rand(B, T, generator=gen(13), dtype=dtype).sort(1).values  # large steps per cell
    edges = torch.linspace(0, 1, T, dtype=dtype)
    down, up = edges.nextafter(torch.zeros_like(edges)), edges.nextafter(torch.ones_like(edges))
    values = (
        torch.cat([edges, down, down.nextafter(torch.zeros_like(edges)), up])
        .clamp(0, 1)
        .sort()
        .values
    )
    out = augment.apply_lut(values.expand(B, -1), lut)
    assert (out.diff(dim=1) >= 0).all()
    assert torch.equal(out[:, 0], lut[:, 0]) and torch.equal(out[:, -1], lut[:, -1])


@pytest.mark.parametrize("seed", range(5))
def test_bezier_intensity_is_monotone_on_a_ramp(seed):
    B, shape = 4, (11, 13, 7)
    ramp = torch.linspace(0, 1, int(np.prod(shape))).expand(B, -1).reshape(B, 1, *shape)
    out = augment.bezier_intensity(ramp, gen(seed), prob=1.0).reshape(B, -1)
    assert (out.diff(dim=1) >= 0).all()
    assert (out[:, 0] == 0).all() and (out[:, -1] == 1).all()
    assert not torch.equal(out, ramp.reshape(B, -1))
    # The same curve as bezier_lut on the generator's first draws (two control points per patch).
    points = torch.rand(B, 4, generator=gen(seed))
    assert torch.equal(out, augment.apply_lut(ramp.reshape(B, -1), augment.bezier_lut(points)))


# ----------------------------------------------------------------------------- vox2vec
# augmentations
@pytest.mark.parametrize("sigma", [0.25, 0.8, 1.5])
def test_blur_matches_scipy(sigma):
    x = random_batch(dtype=torch.float64)
    radius = int(4 * sigma + 0.5)
    ours = augment._blur_xy(x, torch.full((SHAPE[0],), sigma, dtype=torch.float64), radius).numpy()
    reference = gaussian_filter1d(
        gaussian_filter1d(x.numpy(), sigma, axis=2, mode="nearest"), sigma, axis=3, mode="nearest"
    )
    np.testing.assert_allclose(ours, reference, atol=1e-10)


def test_noise_and_window_by_construction():
    x = torch.full(SHAPE, 0.5)
    noisy = augment.gaussian_noise(x, gen(0), prob=1.0, max_std=0.02)
    residual_std = (noisy - x).flatten(1).std(1)
    assert (residual_std < 0.02 * 1.1).all() and (residual_std > 0).any()
    B, shape = 3, (10, 10, 10)
    ramp = torch.linspace(0, 1, 1000).expand(B, -1).reshape(B, 1, *shape)
    out = augment.random_window(ramp, gen(1), prob=1.0, max_low=0.2, min_high=0.7).reshape(B, -1)
    flat = ramp.reshape(B, -1)
    for b in range(B):
        middle = (out[b] > 0) & (out[b] < 1)
        low, high = flat[b][middle].min(), flat[b][middle].max()
        assert low <= 0.2 + 1e-3 and high >= 0.7 - 1e-3  # window inside the allowed ranges
        slope = out[b][middle].diff() / flat[b][middle].diff()
        assert (
            torch.allclose(slope, slope.mean(), rtol=1e-3) and slope.mean() >= 1
        )  # linear stretch


def test_pipelines_compose_in_documented_order():
    x = random_batch()
    g = gen(3)
    local = augment.local_inpaint(augment.bezier_intensity(augment.local_pixel_shuffle(x, g), g), g)
    assert torch.equal(augment.augment_batch(x, gen(3), "local"), local)
    g = gen(4)
    vox2vec = augment.random_window(augment.gaussian_noise(augment.blur_or_sharpen(x, g), g), g)
    assert torch.equal(augment.augment_batch(x, gen(4), "vox2vec"), vox2vec)
