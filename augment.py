"""Local augmentations of Sec. 2.1 (Kats et al. 2024) and the vox2vec baseline's intensity augmentations.

Shapes: a batch of patches is (B, C, X, Y, Z) (C = 1 in this project), values in [0, 1].
Every function is a pure, batched torch function: it runs on the batch's device, draws all its
randomness from the `generator` it is given (a torch.Generator on that same device), never
modifies its input and returns a new tensor of the same shape and dtype, clamped to [0, 1].

Sec. 2.1 ("local" pipeline, Models Genesis family; parameters *(ref)* hierarchical-dense-ssl):
  1. local_pixel_shuffle  p=0.8 per patch: voxels are permuted inside small blocks of
     (X/20, Y/20, Z/20) voxels (6x6x1 for a 128x128x32 patch), 5000 blocks per patch.
  2. bezier_intensity     p=0.9 per patch: a random monotone cubic Bezier curve through (0,0), (1,1).
  3. local_inpaint        always: ~15 boxes of side U(d/10, d/5) replaced by U[0,1) noise.
  Order as in the reference (shuffle -> intensity -> in-painting), so in-painted boxes hold
  plain U[0,1) noise, not a transformed one.
vox2vec baseline ("vox2vec" pipeline; *(ref)* vox2vec pretrain/data.py, HU values converted to
our [0, 1] scale of the clip window [-1350, 1000] HU): blur_or_sharpen -> gaussian_noise -> random_window.

Deviations from the numpy reference, all to stay batched on the GPU without Python loops:
  - Shuffling uses non-overlapping blocks: a grid of cells at a random offset, of which
    min(num_blocks, n_cells) random cells are shuffled (each by its own permutation). The
    reference places 5000 possibly-overlapping blocks one after another (a 5000-step loop whose
    overlaps make it no longer a permutation) and uses one permutation for all blocks.
    The coverage is similar (~34% vs ~29% of the voxels of a 128x128x32 patch).
    The grid offset is drawn once per call (the patches come from random places of their volumes).
  - Bezier: a 1024-point lookup table per patch instead of 100,000 points + np.interp (~90 ms);
    it differs from the reference curve by < 1e-4.
  - In-painting: exactly `num_boxes` boxes (the reference draws a geometric count, mean ~15),
    anywhere fully inside the patch (the reference keeps a 3-voxel margin).
  - vox2vec: blur / sharpen pad borders by replication (scipy reflects); each step clamps to
    [0, 1] (vox2vec clips once, after the window).

Run `python augment.py` to time both pipelines on a random batch (CPU, or --device cuda); expect
~0.5 s for "local" on a (10, 1, 128, 128, 32) batch on a 2-core CPU (the Bezier lookup's
searchsorted is half of it). `python -m pytest tests/test_augment.py` checks each piece against a reference.
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("local", "vox2vec", "none")
HU_WIDTH = 2350.0  # our CT clip window [-1350, 1000] HU; converts vox2vec's HU parameters to [0, 1]


def _check_batch(x):
    if x.ndim != 5:
        raise ValueError(f"augment.py: expected a batch (B, C, X, Y, Z), got shape {tuple(x.shape)}")


def _rand(generator, *size, device):
    return torch.rand(size, generator=generator, device=device)


# ----------------------------------------------------------------------------- Sec. 2.1: shuffling
def _shuffle_grid(dims, block_fraction):
    """Block size b and number of cells n per axis: n cells of b voxels fit at any offset in [0, d - n*b]."""
    block = [max(1, int(d * f + 1e-6)) for d, f in zip(dims, block_fraction)]
    if any(b > d for b, d in zip(block, dims)):
        raise ValueError(f"augment.py: shuffle block {block} larger than the patch {dims}")
    counts = [max(1, (d - b + 1) // b) for d, b in zip(dims, block)]
    return block, counts


def local_pixel_shuffle(x, generator, prob=0.8, num_blocks=5000, block_fraction=(1 / 20, 1 / 20, 1 / 20),
                        return_cells=False):
    """Sec. 2.1 local pixel shuffling. x: (B, C, X, Y, Z) -> (B, C, X, Y, Z); each patch with probability prob.

    The patch is tiled by a grid of non-overlapping cells of (X/20, Y/20, Z/20) voxels (at least 1)
    placed at a random offset (one per call: the patches come from random places of their volumes
    anyway); min(num_blocks, n_cells) random cells per patch get their voxels permuted, the rest,
    and the border strips the grid does not cover, stay in place.
    return_cells=True also returns cell (B, X, Y, Z) int64: the id of the shuffled cell each voxel
    belongs to, -1 where nothing moves (for tests and figures).
    """
    _check_batch(x)
    B, C, dims = x.shape[0], x.shape[1], tuple(x.shape[2:])
    block, counts = _shuffle_grid(dims, block_fraction)
    (bx, by, bz), (nx, ny, nz) = block, counts
    num_cells, cell_volume, k = nx * ny * nz, bx * by * bz, min(num_blocks, nx * ny * nz)
    slack = [d - n * b for d, n, b in zip(dims, counts, block)]
    u = _rand(generator, 3, device=x.device).tolist()  # slicing needs Python ints: one small sync
    ox, oy, oz = [min(int(ui * (s + 1)), s) for ui, s in zip(u, slack)]
    # A random subset of cells by argsort of random keys (as MAE picks its masked patches).
    chosen = _rand(generator, B, num_cells, device=x.device).argsort(1)[:, :k]  # (B, k)
    perm = _rand(generator, B, k, cell_volume, device=x.device).argsort(-1)  # (B, k, cell_volume)
    apply = _rand(generator, B, device=x.device) < prob  # (B,)
    perm = torch.where(apply[:, None, None], perm, torch.arange(cell_volume, device=x.device))

    region = x[:, :, ox:ox + nx * bx, oy:oy + ny * by, oz:oz + nz * bz]  # (B, C, nx*bx, ny*by, nz*bz)
    cells = region.reshape(B, C, nx, bx, ny, by, nz, bz).permute(0, 1, 2, 4, 6, 3, 5, 7)
    cells = cells.reshape(B, C, num_cells, cell_volume)  # (B, C, n_cells, cell_volume)
    index = chosen[:, None, :, None].expand(B, C, k, cell_volume)
    shuffled = cells.gather(2, index).gather(3, perm[:, None].expand(B, C, k, cell_volume))  # (B, C, k, cell_volume)
    cells = cells.scatter(2, index, shuffled)
    out = x.clone()
    out[:, :, ox:ox + nx * bx, oy:oy + ny * by, oz:oz + nz * bz] = (
        cells.reshape(B, C, nx, ny, nz, bx, by, bz).permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(region.shape))
    if not return_cells:
        return out
    ids = torch.full((B, num_cells), -1, dtype=torch.long, device=x.device)
    ids = ids.scatter(1, chosen, torch.where(apply[:, None], chosen, -1))  # (B, n_cells)
    ids = ids.reshape(B, nx, 1, ny, 1, nz, 1).expand(B, nx, bx, ny, by, nz, bz)
    cell = torch.full((B, *dims), -1, dtype=torch.long, device=x.device)
    cell[:, ox:ox + nx * bx, oy:oy + ny * by, oz:oz + nz * bz] = ids.reshape(B, nx * bx, ny * by, nz * bz)
    return out, cell


# ----------------------------------------------------------------------------- Sec. 2.1: in-painting
def inpaint_mask(shape, generator, device=None, num_boxes=15, size_fraction=(0.1, 0.2)):
    """Union of num_boxes random boxes per sample, fully inside the patch. -> (B, 1, X, Y, Z) bool.

    Box side along an axis of d voxels: an integer in [d*lo, d*hi) (at least 1), as the reference's
    randint(d // 10, d // 5).
    """
    batch, dims = shape[0], tuple(shape[-3:])
    low = torch.tensor([max(1, int(d * size_fraction[0])) for d in dims], device=device)
    high = torch.maximum(low, torch.tensor([int(d * size_fraction[1]) - 1 for d in dims], device=device))
    size = low + (_rand(generator, batch, num_boxes, 3, device=device) * (high - low + 1)).long()
    size = size.minimum(high)  # (B, nbox, 3)
    room = torch.tensor(dims, device=device) - size  # last valid start per axis
    start = (_rand(generator, batch, num_boxes, 3, device=device) * (room + 1)).long().minimum(room)
    axis_masks = []
    for a, d in enumerate(dims):  # the 3 axes: interval masks (B, nbox, d)
        coord = torch.arange(d, device=device)
        inside = (coord >= start[..., a:a + 1]) & (coord < (start + size)[..., a:a + 1])
        axis_masks.append(inside.float())
    # Number of boxes covering each voxel: an outer product per box summed over boxes, which
    # einsum turns into one batched matmul instead of a (B, nbox, X, Y, Z) tensor.
    cover = torch.einsum("bnx,bny,bnz->bxyz", *axis_masks)  # (B, X, Y, Z)
    return (cover > 0.5)[:, None]


def local_inpaint(x, generator, num_boxes=15, size_fraction=(0.1, 0.2)):
    """Sec. 2.1 local in-painting, always applied. x: (B, C, X, Y, Z) -> (B, C, X, Y, Z)."""
    _check_batch(x)
    mask = inpaint_mask(x.shape, generator, x.device, num_boxes, size_fraction)  # (B, 1, X, Y, Z)
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # U[0, 1)
    return torch.where(mask, noise, x)


# ----------------------------------------------------------------------------- Sec. 2.1: intensity
def bezier_lut(points, num_points=1024):
    """Monotone lookup table of a cubic Bezier curve through (0,0), P1, P2, (1,1).

    points: (B, 4) = (P1x, P1y, P2x, P2y) in [0, 1]. Returns xs, ys: (B, T) non-decreasing, from
    0 to 1. As Models Genesis, xs and ys are sorted independently, which makes any curve monotone.
    """
    t = torch.linspace(0, 1, num_points, device=points.device, dtype=points.dtype)  # (T,)
    w1, w2, w3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3  # Bernstein weights, P0 = (0, 0)
    xs = points[:, 0:1] * w1 + points[:, 2:3] * w2 + w3  # (B, T)
    ys = points[:, 1:2] * w1 + points[:, 3:4] * w2 + w3  # (B, T)
    xs, ys = xs.clamp(0, 1).sort(1).values, ys.clamp(0, 1).sort(1).values
    xs[:, 0], ys[:, 0], xs[:, -1], ys[:, -1] = 0, 0, 1, 1  # exact endpoints despite rounding
    return xs, ys


def interp_lut(x, xs, ys):
    """Per-sample piecewise-linear map (np.interp on a batch). x: (B, ...), xs, ys: (B, T) -> (B, ...)."""
    B, T = xs.shape
    v = x.reshape(B, -1).clamp(0, 1).to(xs.dtype).contiguous()  # (B, M)
    slope = (ys.diff(dim=1) / xs.diff(dim=1).clamp_min(torch.finfo(xs.dtype).tiny))  # (B, T-1) per segment
    segment = (torch.searchsorted(xs.contiguous(), v, right=True) - 1).clamp(0, T - 2)  # (B, M)
    x0, y0, y1 = xs.gather(1, segment), ys.gather(1, segment), ys.gather(1, segment + 1)
    # Clamping to the segment's [y0, y1] keeps the map exactly monotone despite rounding.
    out = (y0 + (v - x0) * slope.gather(1, segment)).clamp(min=y0, max=y1)
    out = torch.where(v >= 1, 1.0, out)  # v = 1 falls past the last segment's end
    return out.reshape(x.shape).to(x.dtype)


def bezier_intensity(x, generator, prob=0.9, num_points=1024):
    """Sec. 2.1 non-linear intensity transform, each patch with probability prob.
    x: (B, C, X, Y, Z) -> (B, C, X, Y, Z)."""
    _check_batch(x)
    B = x.shape[0]
    lut_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    points = _rand(generator, B, 4, device=x.device).to(lut_dtype)  # two random control points
    apply = _rand(generator, B, device=x.device) < prob  # (B,)
    out = interp_lut(x, *bezier_lut(points, num_points))
    return torch.where(apply[:, None, None, None, None], out, x)


# ----------------------------------------------------------------------------- vox2vec baseline
def _blur_xy(x, sigma, radius):
    """Gaussian blur in the axial (X, Y) plane as vox2vec, per-sample sigma (B,) in voxels.
    x: (B, C, X, Y, Z) -> (B, C, X, Y, Z); one grouped conv3d per axis (separable)."""
    B, C = x.shape[:2]
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.to(x.dtype)[:, None]) ** 2)  # (B, K)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, K)
    h = x.reshape(1, B * C, *x.shape[2:])  # samples as channels: (1, B*C, X, Y, Z)
    h = F.pad(h, (0, 0, 0, 0, radius, radius), mode="replicate")  # (1, B*C, X + 2r, Y, Z)
    h = F.conv3d(h, kernel.view(B * C, 1, -1, 1, 1), groups=B * C)  # along X
    h = F.pad(h, (0, 0, radius, radius, 0, 0), mode="replicate")  # (1, B*C, X, Y + 2r, Z)
    h = F.conv3d(h, kernel.view(B * C, 1, 1, -1, 1), groups=B * C)  # along Y
    return h.reshape(x.shape)


def blur_or_sharpen(x, generator, prob=0.5, blur_sigma=(0.25, 1.5), sharpen_sigma=(0.5, 1.0),
                    sharpen_sigma_2=0.5, sharpen_alpha=(10.0, 30.0)):
    """vox2vec: with probability prob, blur or sharpen (50/50) in the axial plane.

    Blur: Gaussian, sigma ~ U(blur_sigma) voxels. Sharpen (MONAI GaussianSharpen, as vox2vec):
    b = blur(x, s1), out = b + alpha * (b - blur(b, s2)), s1 ~ U(sharpen_sigma), alpha ~ U(sharpen_alpha).
    Defaults *(ref)* vox2vec pretrain/data.py. x: (B, C, X, Y, Z) -> (B, C, X, Y, Z).
    """
    _check_batch(x)
    u = _rand(generator, x.shape[0], 4, device=x.device)  # apply, blur-or-sharpen, sigma, alpha
    apply, blur = u[:, 0] < prob, u[:, 1] < 0.5
    sigma = torch.where(blur, blur_sigma[0] + u[:, 2] * (blur_sigma[1] - blur_sigma[0]),
                        sharpen_sigma[0] + u[:, 2] * (sharpen_sigma[1] - sharpen_sigma[0]))
    alpha = (sharpen_alpha[0] + u[:, 3] * (sharpen_alpha[1] - sharpen_alpha[0])).to(x.dtype)
    radius = int(4 * max(blur_sigma[1], sharpen_sigma[1]) + 0.5)  # truncate at 4 sigma, as scipy
    blurred = _blur_xy(x, sigma, radius)
    reblurred = _blur_xy(blurred, torch.full_like(sigma, sharpen_sigma_2), int(4 * sharpen_sigma_2 + 0.5))
    sharpened = blurred + alpha[:, None, None, None, None] * (blurred - reblurred)
    out = torch.where(blur[:, None, None, None, None], blurred, sharpened)
    return torch.where(apply[:, None, None, None, None], out, x).clamp(0, 1)


def gaussian_noise(x, generator, prob=0.5, max_std=30.0 / HU_WIDTH):
    """vox2vec: with probability prob add N(0, std^2) noise, std ~ U(0, 30 HU). x: (B, C, X, Y, Z) -> same."""
    _check_batch(x)
    u = _rand(generator, x.shape[0], 2, device=x.device)  # apply, std
    std = torch.where(u[:, 0] < prob, u[:, 1] * max_std, 0.0).to(x.dtype)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + std[:, None, None, None, None] * noise).clamp(0, 1)


def random_window(x, generator, prob=0.8, max_low=350.0 / HU_WIDTH, min_high=1650.0 / HU_WIDTH):
    """vox2vec: with probability prob rescale a random window [lo, hi] of [0, 1] to [0, 1] and clip.

    lo ~ U(0, max_low), hi ~ U(min_high, 1): vox2vec's windows from [-1350..-1000, 300..1000] HU.
    x: (B, C, X, Y, Z) -> (B, C, X, Y, Z).
    """
    _check_batch(x)
    u = _rand(generator, x.shape[0], 3, device=x.device)  # apply, lo, hi
    apply = u[:, 0] < prob
    low = torch.where(apply, u[:, 1] * max_low, 0.0).to(x.dtype)[:, None, None, None, None]
    high = torch.where(apply, min_high + u[:, 2] * (1 - min_high), 1.0).to(x.dtype)[:, None, None, None, None]
    return ((x - low) / (high - low)).clamp(0, 1)


# ----------------------------------------------------------------------------- pipelines
def augment_batch(x, generator, kind="local"):
    """The augmentation t ~ T of Sec. 2.1, drawn per patch. x: (B, C, X, Y, Z) -> (B, C, X, Y, Z).

    kind: "local" (ours: shuffle -> Bezier -> in-painting), "vox2vec" (blur/sharpen -> noise ->
    window) or "none" (a copy).
    """
    if kind not in KINDS:
        raise ValueError(f"augment.py: kind must be one of {KINDS}, got {kind!r}")
    _check_batch(x)
    if kind == "local":
        x = local_pixel_shuffle(x, generator)
        x = bezier_intensity(x, generator)
        return local_inpaint(x, generator)
    if kind == "vox2vec":
        x = blur_or_sharpen(x, generator)
        x = gaussian_noise(x, generator)
        return random_window(x, generator)
    return x.clone()


def main(args):
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.rand((args.batch_size, 1, *args.patch_size), generator=generator, device=device)
    for kind in KINDS:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            y = augment_batch(x, generator, kind)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        changed = (y != x).float().mean().item()
        print(f"{kind:8s} {1000 * np.median(times):8.1f} ms per batch of {tuple(x.shape)} "
              f"(median of {args.repeats}), {100 * changed:.0f}% of voxels changed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=10, help="patches per batch (paper: 10 pairs)")
    parser.add_argument("--patch_size", type=int, nargs=3, default=[128, 128, 32], help="X Y Z voxels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
