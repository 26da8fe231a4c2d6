"""supervised_augment.py (nnU-Net-like augmentation for finetune.py): image and label stay
aligned, flips are exact, zero strength is the identity, each transform's draws follow its
parameters, no class appears that was not in the patch, meta tensors (no host sync), and the
blur against scipy."""

import os
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter1d

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import supervised_augment as augment  # noqa: E402


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def blob_label(batch=4, shape=(24, 20, 12)):
    """Boxes of classes 1, 3 and 4 on background 0: (B, X, Y, Z) int64."""
    y = torch.zeros(batch, *shape, dtype=torch.long)
    y[:, 3:14, 4:15, 2:9] = 1
    y[:, 12:22, 2:8, 5:11] = 3
    y[:, 2:6, 14:19, 1:4] = 4
    return y


def test_spatial_transform_keeps_image_and_label_aligned():
    """A label-coloured image transformed with nearest sampling equals the transformed label
    everywhere (same grid); with trilinear sampling it stays within 0.5 of it on most voxels."""
    y = blob_label()
    x = y[:, None].float()
    for seed in range(3):
        xr, yr = augment.random_rotate_scale(
            x, y, gen(seed), rotation_prob=1, scale_prob=1, image_mode="nearest"
        )
        assert torch.equal(xr[:, 0], yr.float())
        assert (yr != y).any()  # it did move
        xr, yr = augment.random_rotate_scale(x, y, gen(seed), rotation_prob=1, scale_prob=1)
        assert ((xr[:, 0] - yr).abs() < 0.5).float().mean() > 0.9
    # the check can fail: a label moved without its image is far from it
    _, y_other = augment.random_rotate_scale(
        x, y, gen(99), rotation_prob=1, scale_prob=1, image_mode="nearest"
    )
    assert not torch.equal(xr[:, 0].round(), y_other.float())


def test_rotation_by_the_same_draw_as_a_naive_resampler():
    """Output voxel p reads the input at s * R p about the centre: checked against a per-voxel
    nearest-neighbour loop in numpy for one rotated and scaled patch."""
    y = blob_label(batch=1, shape=(10, 8, 6))
    x = torch.rand(1, 1, 10, 8, 6, generator=gen(5))
    g = gen(7)
    u = torch.rand(1, 6, generator=gen(7))  # the draws random_rotate_scale makes first
    xr, _ = augment.random_rotate_scale(
        x, y, g, rotation_prob=1, scale_prob=1, image_mode="nearest"
    )
    angles = ((2 * u[0, 3:] - 1) * 30 * np.pi / 180).double().numpy()
    s = 0.7 + u[0, 2].item() * 0.7
    cx, sx = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx[0], -sx[0]], [0, sx[0], cx[0]]])
    ry = np.array([[cx[1], 0, sx[1]], [0, 1, 0], [-sx[1], 0, cx[1]]])
    rz = np.array([[cx[2], -sx[2], 0], [sx[2], cx[2], 0], [0, 0, 1]])
    m = s * rz @ ry @ rx
    dims = np.array(x.shape[2:])
    src, out, near = x[0, 0].numpy(), xr[0, 0].numpy(), 0
    for p in np.ndindex(*dims):
        q = m @ (np.array(p) + 0.5 - dims / 2) + dims / 2 - 0.5  # voxel-centre coordinates
        i = np.clip(np.floor(q + 0.5).astype(int), 0, dims - 1)  # nearest, border replicated
        frac = np.abs(q + 0.5 - np.floor(q + 0.5) - 0.5)  # distance from a rounding tie
        if frac.max() < 0.499:  # away from ties (float rounding)
            assert out[p] == src[tuple(i)], p
            near += 1
    assert near > 0.9 * dims.prod()


def test_flips_are_exact_and_move_the_label_too():
    x = torch.rand(8, 1, 6, 5, 4, generator=gen(1))
    y = torch.randint(0, 5, (8, 6, 5, 4), generator=gen(2))
    xf, yf = augment.random_flip(x, y, gen(3), prob=1.0)
    assert torch.equal(xf, x.flip(2, 3, 4)) and torch.equal(yf, y.flip(1, 2, 3))
    xf, yf = augment.random_flip(x, y, gen(3), prob=0.0)
    assert torch.equal(xf, x) and torch.equal(yf, y)
    xf, yf = augment.random_flip(x, y, gen(4), prob=0.5)
    combos = [tuple(a for a, f in zip((0, 1, 2), bits) if f) for bits in np.ndindex(2, 2, 2)]
    seen = set()
    for b in range(
        8
    ):  # each patch is exactly one of the 8 flip combinations, its label the same one
        match = [
            c for c in combos if torch.equal(xf[b], x[b].flip([1 + a for a in c]) if c else x[b])
        ]
        assert len(match) == 1
        c = match[0]
        assert torch.equal(yf[b], y[b].flip([a for a in c]) if c else y[b])
        seen.add(c)
    assert len(seen) > 1


ZERO_STRENGTH = {
    "brightness": lambda x, g: augment.brightness(x, g, prob=1, factor=(1.0, 1.0)),
    "contrast": lambda x, g: augment.contrast(x, g, prob=1, factor=(1.0, 1.0)),
    "gamma": lambda x, g: augment.gamma(x, g, prob=1, gamma_range=(1.0, 1.0)),
    "inverted gamma": lambda x, g: augment.gamma(x, g, prob=1, gamma_range=(1.0, 1.0), invert=True),
    "noise": lambda x, g: augment.additive_noise(x, g, prob=1, variance=(0.0, 0.0)),
    "blur": lambda x, g: augment.gaussian_blur(x, g, prob=1, sigma=(0.0, 0.0)),
    "rotate/scale": lambda x, g: augment.random_rotate_scale(
        x, torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long), g, 1, 0.0, 1, (1.0, 1.0)
    )[0],
}


@pytest.mark.parametrize("name", list(ZERO_STRENGTH))
def test_zero_strength_is_the_identity(name):
    x = torch.rand(3, 1, 12, 10, 6, generator=gen(0))
    out = ZERO_STRENGTH[name](x, gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, x, atol=2e-6, rtol=0)


def proportion_ok(hits, n, p):
    """hits out of n within 4 standard errors of p."""
    return abs(hits / n - p) < 4 * np.sqrt(p * (1 - p) / n)


def test_brightness_statistics():
    n = 4000
    x = torch.full((n, 1, 2, 2, 2), 0.5)
    f = (augment.brightness(x, gen(0), prob=0.15) / x)[:, 0, 0, 0, 0]
    applied = f[(f - 1).abs() > 1e-7]
    assert proportion_ok(len(applied), n, 0.15)
    assert applied.min() >= 0.75 and applied.max() <= 1.25
    assert proportion_ok(int((applied < 1).sum()), len(applied), 0.5)  # BGContrast: half below 1
    assert abs(applied[applied < 1].mean().item() - 0.875) < 0.02  # U(0.75, 1) mean
    assert abs(applied[applied > 1].mean().item() - 1.125) < 0.02  # U(1, 1.25) mean


def test_gamma_statistics():
    """On a ramp 0, 0.5, 1 the exponent is recovered as log2 of the rescaled middle value (the
    mean / std restoration is affine, so it keeps that ratio)."""
    n = 4000
    ramp = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3, 1, 1).repeat(n, 1, 1, 1, 1)
    out = augment.gamma(ramp, gen(0), prob=0.3)[:, 0, :, 0, 0]
    ratio = (out[:, 1] - out[:, 0]) / (out[:, 2] - out[:, 0])
    g = torch.log(ratio) / np.log(0.5)
    applied = g[(g - 1).abs() > 1e-4]
    assert proportion_ok(len(applied), n, 0.3)
    assert applied.min() >= 0.7 - 1e-3 and applied.max() <= 1.5 + 1e-3
    assert proportion_ok(int((applied < 1).sum()), len(applied), 0.5)
    # mean and standard deviation of every patch are kept
    torch.testing.assert_close(out.mean(1), ramp[:, 0, :, 0, 0].mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(1), ramp[:, 0, :, 0, 0].std(1), atol=1e-5, rtol=0)


def test_contrast_statistics_and_range():
    n = 2000
    x = torch.rand(n, 1, 4, 4, 2, generator=gen(3))
    out = augment.contrast(x, gen(4), prob=0.15)
    flat_x, flat_o = x.reshape(n, -1), out.reshape(n, -1)
    changed = (flat_o != flat_x).any(1)
    assert proportion_ok(int(changed.sum()), n, 0.15)
    assert (flat_o.min(1).values >= flat_x.min(1).values).all() and (
        flat_o.max(1).values <= flat_x.max(1).values
    ).all()
    # unclipped voxels: deviation from the mean scaled by one factor in [0.75, 1.25]
    m = flat_x.mean(1, keepdim=True)
    f = ((flat_o - m) / (flat_x - m))[changed]
    inside = (flat_o[changed] > flat_x[changed].min(1, keepdim=True).values) & (
        flat_o[changed] < flat_x[changed].max(1, keepdim=True).values
    )
    assert f[inside].min() >= 0.75 - 1e-4 and f[inside].max() <= 1.25 + 1e-4


def test_noise_statistics():
    """Per patch the added noise has variance v * std(patch)^2 with v ~ U(0, 0.1): mean 0.05."""
    n = 3000
    x = torch.rand(n, 1, 8, 8, 8, generator=gen(5))
    out = augment.additive_noise(x, gen(6), prob=0.1)
    v = (out - x).reshape(n, -1).var(1) / x.reshape(n, -1).var(1)
    applied = v[v > 0]
    assert proportion_ok(len(applied), n, 0.1)
    assert applied.max() < 0.1 * 1.4  # 512 voxels: a few % sampling error
    assert abs(applied.mean().item() - 0.05) < 0.01


def test_blur_matches_scipy():
    x = torch.rand(3, 1, 10, 9, 7, generator=gen(7), dtype=torch.float64)
    u = torch.rand(3, 4, generator=gen(8), dtype=torch.float32)  # the draws gaussian_blur makes
    out = augment.gaussian_blur(x, gen(8), prob=1.0)
    for b in range(3):
        ref = x[b, 0].numpy()
        for axis in range(3):
            ref = gaussian_filter1d(
                ref, 0.5 + u[b, 1 + axis].item() * 0.5, axis=axis, mode="nearest", radius=3
            )
        np.testing.assert_allclose(out[b, 0].numpy(), ref, atol=1e-6)


def test_no_transform_creates_a_class():
    y = blob_label(batch=6)
    y[y == 1] = 0  # classes 0, 3, 4 only
    x = torch.rand(6, 1, *y.shape[1:], generator=gen(9))
    for seed in range(10):
        _, out = augment.supervised_augment(x, y, gen(seed))
        assert set(out.unique().tolist()) <= {0, 3, 4}
        _, out = augment.random_rotate_scale(x, y, gen(seed), rotation_prob=1, scale_prob=1)
        assert set(out.unique().tolist()) <= {0, 3, 4}
    # also where a patch holds no background at all
    full = torch.full((2, 8, 8, 4), 3, dtype=torch.long)
    _, out = augment.random_rotate_scale(
        torch.rand(2, 1, 8, 8, 4), full, gen(0), rotation_prob=1, scale_prob=1
    )
    assert torch.equal(out, full)


def test_reproducible_from_the_seed_and_independent_per_patch():
    y = blob_label()
    x = torch.rand(4, 1, *y.shape[1:], generator=gen(10))
    a = augment.supervised_augment(x, y, gen(11))
    b = augment.supervised_augment(x, y, gen(11))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = augment.supervised_augment(x, y, gen(12))
    assert not torch.equal(a[0], c[0])
    none = augment.supervised_augment(x, y, gen(11), kind="none")
    assert none[0] is x and none[1] is y
    with pytest.raises(ValueError, match="supervised kind"):
        augment.supervised_augment(x, y, gen(0), kind="local")


def test_supervised_augment_on_meta_tensors():
    """Meta tensors have no values: any read-back to the host (.item(), a data-dependent shape)
    fails."""
    x = torch.empty(2, 1, 16, 16, 8, device="meta")
    y = torch.empty(2, 16, 16, 8, dtype=torch.long, device="meta")
    xo, yo = augment.supervised_augment(x, y, None)
    assert (
        xo.shape == x.shape and yo.shape == y.shape and xo.device.type == yo.device.type == "meta"
    )
    assert yo.dtype == torch.long
