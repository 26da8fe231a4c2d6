"""nnU-Net-like augmentation of a labelled patch and its label (finetune.py --aug; not the paper's,
whose downstream training, like vox2vec's, uses none).

nnU-Net v2's defaults (nnUNetTrainer.get_training_transforms) in its order: rotation / scaling ->
Gaussian noise -> Gaussian blur -> brightness -> contrast -> gamma (inverted, then plain) ->
mirroring along the axes it may flip (--mirror-axes: on data whose classes are sided, a left-right
flip turns one class into the other). Image (B, C, X, Y, Z) float, label (B, X, Y, Z) int; batched
torch on the patches' device, randomness from the given `generator`, no read back to the host;
intensities not clamped (nor in nnU-Net). Left out: elastic deformation (off in nnU-Net too) and
simulated low resolution (a shape drawn at random). Deviation: positions that rotation or scaling
brings in from outside the patch take the border voxel (nnU-Net transforms a larger region).
"""
import torch
import torch.nn.functional as F

from augment import _check_batch, _rand, _separable_blur

SUPERVISED_KINDS = ("nnunet-like", "none")


def _bg_factor(generator, batch, low, high, device):
    """nnU-Net's BGContrast draw, (B,): half of the factors from U(low, 1), half from U(1, high)."""
    u = _rand(generator, batch, 2, device=device)
    return torch.where(u[:, 0] < 0.5, low + u[:, 1] * (1 - low), 1 + u[:, 1] * (high - 1))


def _per_patch(x, fn):
    """fn over each patch's voxels, kept broadcastable: (B, C, X, Y, Z) -> (B, 1, 1, 1, 1)."""
    return fn(x.reshape(x.shape[0], -1), 1).view(-1, 1, 1, 1, 1)


def random_flip(x, y, generator, prob=0.5, axes=(0, 1, 2)):
    """Mirror each patch along each of `axes` (0 = X, 1 = Y, 2 = Z) with probability prob, the
    label with it. x: (B, C, X, Y, Z), y: (B, X, Y, Z) -> the same shapes; exact (no resampling)."""
    _check_batch(x)
    flip = _rand(generator, x.shape[0], len(axes), device=x.device) < prob  # (B, A)
    for i, a in enumerate(axes):
        x = torch.where(flip[:, i].view(-1, 1, 1, 1, 1), x.flip(2 + a), x)
        y = torch.where(flip[:, i].view(-1, 1, 1, 1), y.flip(1 + a), y)
    return x, y


def _rotation(angles):
    """(B, 3) angles in radians about X, Y, Z -> (B, 3, 3) rotation matrices R_z R_y R_x."""
    c, s = angles.cos(), angles.sin()
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1)
    return rz.view(-1, 3, 3) @ ry.view(-1, 3, 3) @ rx.view(-1, 3, 3)


def random_rotate_scale(x, y, generator, rotation_prob=0.2, max_angle=30.0, scale_prob=0.2,
                        scale_range=(0.7, 1.4), image_mode="bilinear"):
    """Rotate (each axis by U(-max_angle, max_angle) degrees) with probability rotation_prob and
    scale (one factor s ~ U(scale_range) for all axes) with probability scale_prob, about the
    patch centre in voxel coordinates; output voxel p reads input position s * R p (s < 1 zooms in).
    The image is resampled trilinearly (image_mode), the label by nearest neighbour, so it holds
    only classes that were in the patch. x: (B, C, X, Y, Z), y: (B, X, Y, Z) -> the same shapes.
    Deviation from nnU-Net: it transforms a larger region and crops the patch out; here the patch
    itself is transformed and positions outside it take the nearest border voxel ("border")."""
    _check_batch(x)
    B, dims = x.shape[0], x.shape[2:]
    u = _rand(generator, B, 6, device=x.device)  # rotate?, scale?, s, three angles
    rotate, scale = u[:, 0] < rotation_prob, u[:, 1] < scale_prob
    angles = torch.where(rotate[:, None], (2 * u[:, 3:] - 1) * max_angle * torch.pi / 180, 0.0)
    s = torch.where(scale, scale_range[0] + u[:, 2] * (scale_range[1] - scale_range[0]), 1.0)
    # Voxel-space matrix -> affine_grid's normalised coordinates: D^-1 (s R) D with D =
    # diag(dims / 2), then reversed to affine_grid's (Z, Y, X) order of (W, H, D).
    half = torch.tensor([d / 2 for d in dims], device=x.device, dtype=torch.float32)
    matrix = _rotation(angles) * s.view(-1, 1, 1) * half[None, None, :] / half[None, :, None]
    theta = torch.cat([matrix.flip(1, 2), torch.zeros(B, 3, 1, device=x.device)], 2)  # (B, 3, 4)
    grid = F.affine_grid(theta, (B, 1, *dims), align_corners=False)  # (B, X, Y, Z, 3)
    moved_x = F.grid_sample(x.float(), grid, mode=image_mode, padding_mode="border",
                            align_corners=False)
    moved_y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="border",
                            align_corners=False)
    keep = (~rotate & ~scale).view(-1, 1, 1, 1, 1)  # untouched patches stay bit-exact
    return (torch.where(keep, x, moved_x.to(x.dtype)),
            torch.where(keep[:, 0], y, moved_y[:, 0].round().to(y.dtype)))


def additive_noise(x, generator, prob=0.1, variance=(0.0, 0.1)):
    """Gaussian noise N(0, v * std(patch)^2), v ~ U(variance), with probability prob. nnU-Net adds
    N(0, v) to z-scored images; scaling by the patch's own standard deviation keeps that meaning on
    our [0, 1] images. x: (B, C, X, Y, Z) -> the same shape."""
    _check_batch(x)
    u = _rand(generator, x.shape[0], 2, device=x.device)
    v = torch.where(u[:, 0] < prob, variance[0] + u[:, 1] * (variance[1] - variance[0]), 0.0)
    std = v.to(x.dtype).sqrt().view(-1, 1, 1, 1, 1) * _per_patch(x, torch.std)
    return x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def gaussian_blur(x, generator, prob=0.1, sigma=(0.5, 1.0)):
    """Gaussian blur with its own sigma ~ U(sigma) voxels per axis, with probability prob (nnU-Net:
    0.2 per patch x 0.5 per channel). x: (B, C, X, Y, Z) -> the same shape."""
    _check_batch(x)
    u = _rand(generator, x.shape[0], 4, device=x.device)  # apply, three sigmas
    sigmas = torch.where(u[:, :1] < prob, sigma[0] + u[:, 1:] * (sigma[1] - sigma[0]), 0.0)
    return _separable_blur(x, sigmas, radius=int(3 * sigma[1] + 0.5))


def brightness(x, generator, prob=0.15, factor=(0.75, 1.25)):
    """Each patch times f ~ BGContrast(factor), with probability prob. (B, C, X, Y, Z) -> same."""
    _check_batch(x)
    f = _bg_factor(generator, x.shape[0], *factor, x.device)
    apply = _rand(generator, x.shape[0], device=x.device) < prob
    return x * torch.where(apply, f, 1.0).to(x.dtype).view(-1, 1, 1, 1, 1)


def contrast(x, generator, prob=0.15, factor=(0.75, 1.25)):
    """Scale each patch's deviations from its mean by f ~ BGContrast(factor) with probability prob,
    then clip to the patch's own [min, max] (nnU-Net's preserve_range). (B, C, X, Y, Z) -> same."""
    _check_batch(x)
    f = _bg_factor(generator, x.shape[0], *factor, x.device)
    apply = _rand(generator, x.shape[0], device=x.device) < prob
    f = torch.where(apply, f, 1.0).to(x.dtype).view(-1, 1, 1, 1, 1)
    mean = _per_patch(x, torch.mean)
    low, high = _per_patch(x, torch.amin), _per_patch(x, torch.amax)
    return torch.where(apply.view(-1, 1, 1, 1, 1), ((x - mean) * f + mean).clamp(low, high), x)


def gamma(x, generator, prob=0.3, gamma_range=(0.7, 1.5), invert=False, eps=1e-7):
    """x -> x^g on the patch rescaled to [0, 1], g ~ BGContrast(gamma_range), with probability prob;
    the patch's mean and standard deviation are then restored (nnU-Net's retain_stats). invert:
    applied to -x (nnU-Net runs it once inverted at prob 0.1 and once plain at 0.3).
    x: (B, C, X, Y, Z) -> the same shape."""
    _check_batch(x)
    g = _bg_factor(generator, x.shape[0], *gamma_range, x.device).to(x.dtype).view(-1, 1, 1, 1, 1)
    apply = (_rand(generator, x.shape[0], device=x.device) < prob).view(-1, 1, 1, 1, 1)
    v = -x if invert else x
    mean, std = _per_patch(v, torch.mean), _per_patch(v, torch.std)
    low, high = _per_patch(v, torch.amin), _per_patch(v, torch.amax)
    out = ((v - low) / (high - low + eps)).pow(g) * (high - low + eps) + low
    out = (out - _per_patch(out, torch.mean)) / (_per_patch(out, torch.std) + 1e-8) * std + mean
    return torch.where(apply, -out if invert else out, x)


def supervised_augment(x, y, generator, kind="nnunet-like", mirror_axes=(0, 1, 2)):
    """finetune.py --aug: each training patch and its label drawn through nnU-Net v2's default
    order: rotate / scale -> noise -> blur -> brightness -> contrast -> gamma (inverted, then
    plain) -> mirror along `mirror_axes` (none: no mirroring).
    x: (B, C, X, Y, Z) float, y: (B, X, Y, Z) int -> the same shapes."""
    if kind not in SUPERVISED_KINDS:
        raise ValueError(f"supervised_augment.py: supervised kind must be one of "
                         f"{SUPERVISED_KINDS}, got {kind!r}")
    if kind == "none":
        return x, y
    x, y = random_rotate_scale(x, y, generator)
    x = additive_noise(x, generator)
    x = gaussian_blur(x, generator)
    x = brightness(x, generator)
    x = contrast(x, generator)
    x = gamma(x, generator, prob=0.1, invert=True)
    x = gamma(x, generator)
    return random_flip(x, y, generator, axes=tuple(mirror_axes)) if mirror_axes else (x, y)
