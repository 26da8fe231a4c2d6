"""Local augmentations of Sec. 2.1 (Kats et al. 2024), and the vox2vec baseline's intensity ones.

A batch of patches is (B, C, X, Y, Z) in [0, 1]. Every function is pure and batched: it runs on
the batch's device, draws all its randomness from the `generator` it is given, returns a new
tensor of the input's shape and dtype clamped to [0, 1], and never reads back to the host, so
the training step never waits for the GPU.

Sec. 2.1, the "local" pipeline (Zhou et al. 2021's local augmentations; parameters *(ref)*
hierarchical-dense-ssl), in the reference's order (in-painted boxes hold plain U[0, 1) noise):
  1. local_pixel_shuffle  p=0.8: voxels permuted inside blocks of (X/20, Y/20, Z/20), 5000 blocks.
  2. bezier_intensity     p=0.9: a random monotone cubic Bezier curve through (0,0), (1,1).
  3. local_inpaint        always: ~15 boxes of side U(d/10, d/5) replaced by U[0,1) noise.
The vox2vec baseline (*(ref)* vox2vec pretrain/data.py, its HU values on our [0, 1] scale of the
[-1350, 1000] HU window): blur_or_sharpen -> gaussian_noise -> random_window.

Deviations from the numpy reference, all to stay batched on the device: shuffling permutes
min(5000, cells) non-overlapping cells of a grid at a random offset, each by its own permutation
(the reference's 5000 possibly-overlapping blocks share one permutation; both move about a third
of the patch); the Bezier curve is a 4096-entry table per patch applied by index arithmetic
(tests/test_augment.py bounds its difference to a dense curve); exactly `num_boxes` in-painted
boxes anywhere inside the patch (the reference: a geometric count, a 3-voxel margin); vox2vec's
blur pads by replication and each step clamps to [0, 1]. Fine-tuning's augmentation (not the
paper's) is supervised_augment.py.
"""
import torch
import torch.nn.functional as F

KINDS = ("local", "vox2vec", "none")
LUT_SIZE = 4096  # Bezier table entries: fewer cost accuracy (tests/test_augment.py), more cost time
HU_WIDTH = 2350.0  # our CT clip window [-1350, 1000] HU; converts vox2vec's HU parameters to [0, 1]


def _check_batch(x):
    if x.ndim != 5:
        raise ValueError(f"augment.py: expected a batch (B, C, X, Y, Z), got {tuple(x.shape)}")


def _rand(generator, *size, device):
    return torch.rand(size, generator=generator, device=device)


# ----------------------------------------------------------------------------- Sec. 2.1: shuffling
def _shuffle_grid(dims, block_fraction):
    """Cell size b and count n per axis: n cells of b voxels fit at any offset in [0, d - nb]."""
    block = [max(1, int(d * f + 1e-6)) for d, f in zip(dims, block_fraction)]
    if any(b > d for b, d in zip(block, dims)):
        raise ValueError(f"augment.py: shuffle block {block} larger than the patch {dims}")
    counts = [max(1, (d - b + 1) // b) for d, b in zip(dims, block)]
    return block, counts


def _grid_index(ax, ay, az):
    """Flat voxel indices from per-axis terms (x*Y*Z, y*Z, z): every combination, in (x, y, z)."""
    return (ax[:, None, None] + ay[None, :, None] + az[None, None, :]).reshape(-1)


def local_pixel_shuffle(x, generator, prob=0.8, num_blocks=5000, block_fraction=(1 / 20,) * 3,
                        return_cells=False):
    """Sec. 2.1 local pixel shuffling, each patch with probability prob: (B, C, X, Y, Z) -> same.

    Each patch is tiled by a grid of cells of (X/20, Y/20, Z/20) voxels (at least 1) at its own
    random offset; min(num_blocks, cells) random cells get their voxels permuted, the rest and the
    strips the grid leaves uncovered stay. One gather and one scatter of flat indices computed on
    the device. return_cells: also the shuffled cell of each voxel, (B, X, Y, Z), -1 where none.
    """
    _check_batch(x)
    B, C, dims = x.shape[0], x.shape[1], tuple(x.shape[2:])
    block, counts = _shuffle_grid(dims, block_fraction)
    num_cells, cell_volume = counts[0] * counts[1] * counts[2], block[0] * block[1] * block[2]
    k = min(num_blocks, num_cells)
    device, strides = x.device, (dims[1] * dims[2], dims[2], 1)  # flat index = x*Y*Z + y*Z + z
    # The flat index of each cell's first voxel for a grid at offset 0 (n_cells,), cells in
    # (x, y, z) order, and of each voxel of a cell relative to its first voxel (cell_volume,).
    corner = _grid_index(*[torch.arange(n, device=device) * (b * s)
                           for n, b, s in zip(counts, block, strides)])
    within = _grid_index(*[torch.arange(b, device=device) * s for b, s in zip(block, strides)])
    # Per patch, the grid's offset, uniform in [0, slack] per axis, as a flat index (B,).
    slack = [d - n * b for d, n, b in zip(dims, counts, block)]
    u = _rand(generator, B, 3, device=device)
    offset = sum((u[:, a] * (slack[a] + 1)).long().clamp_max(slack[a]) * strides[a]
                 for a in range(3))
    # A random subset of cells by argsort of random keys (as MAE picks its masked patches).
    chosen = _rand(generator, B, num_cells, device=device).argsort(1)[:, :k]  # (B, k)
    perm = _rand(generator, B, k, cell_volume, device=device).argsort(-1)  # (B, k, cell_volume)
    apply = _rand(generator, B, device=device) < prob  # (B,)
    perm = torch.where(apply[:, None, None], perm, torch.arange(cell_volume, device=device))

    start = offset[:, None] + corner[chosen]  # (B, k) flat index of each chosen cell's first voxel
    target = (start[:, :, None] + within).reshape(B, 1, k * cell_volume)  # (B, 1, k*cell_volume)
    source = (start[:, :, None] + within[perm]).reshape(B, 1, k * cell_volume)  # moved to target
    flat = x.reshape(B, C, -1)  # (B, C, X*Y*Z)
    moved = flat.gather(2, source.expand(B, C, -1))  # (B, C, k*cell_volume)
    out = flat.scatter(2, target.expand(B, C, -1), moved).reshape(x.shape)
    if not return_cells:
        return out
    ids = torch.where(apply[:, None], chosen, -1)[:, :, None].expand(B, k, cell_volume)
    cell = torch.full((B, flat.shape[2]), -1, dtype=torch.long, device=device)
    cell = cell.scatter(1, target[:, 0], ids.reshape(B, -1))  # (B, X*Y*Z)
    return out, cell.reshape(B, *dims)


# ---------------------------------------------------------------------------- Sec. 2.1: in-painting
def inpaint_mask(shape, generator, device=None, num_boxes=15, size_fraction=(0.1, 0.2)):
    """Union of num_boxes random boxes per sample, fully inside the patch. -> (B, 1, X, Y, Z) bool.

    Box side along an axis of d voxels: an integer in [d*lo, d*hi) (at least 1), as the reference's
    randint(d // 10, d // 5).
    """
    batch, dims = shape[0], tuple(shape[-3:])
    u_size = _rand(generator, batch, num_boxes, 3, device=device)  # (B, nbox, 3)
    u_start = _rand(generator, batch, num_boxes, 3, device=device)  # (B, nbox, 3)
    axis_masks = []
    for a, d in enumerate(dims):  # the 3 axes: interval masks (B, nbox, d); bounds as Python ints
        low = max(1, int(d * size_fraction[0]))
        high = max(low, int(d * size_fraction[1]) - 1)
        size = (low + (u_size[..., a] * (high - low + 1)).long()).clamp_max(high)  # (B, nbox)
        room = d - size  # last valid start
        start = (u_start[..., a] * (room + 1)).long().minimum(room)  # (B, nbox)
        coord = torch.arange(d, device=device)
        inside = (coord >= start[..., None]) & (coord < (start + size)[..., None])
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
def bezier_curve(points, num_points=LUT_SIZE):
    """Knots of a monotone cubic Bezier curve through (0,0), P1, P2, (1,1) at num_points t's.

    points: (B, 4) = (P1x, P1y, P2x, P2y) in [0, 1] -> xs, ys: (B, T) non-decreasing from 0 to 1.
    As Zhou et al.'s code, xs and ys are sorted apart, which makes any curve monotone.
    """
    t = torch.linspace(0, 1, num_points, device=points.device, dtype=points.dtype)  # (T,)
    w1, w2, w3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3  # Bernstein, P0 = (0, 0)
    xs = points[:, 0:1] * w1 + points[:, 2:3] * w2 + w3  # (B, T)
    ys = points[:, 1:2] * w1 + points[:, 3:4] * w2 + w3  # (B, T)
    xs, ys = xs.clamp(0, 1).sort(1).values, ys.clamp(0, 1).sort(1).values
    xs[:, 0], ys[:, 0], xs[:, -1], ys[:, -1] = 0, 0, 1, 1  # exact endpoints despite rounding
    return xs, ys


def interp_knots(x, xs, ys):
    """Per sample, the piecewise-linear map through (xs, ys), np.interp on a batch: x (B, ...) ->
    (B, ...), xs, ys (B, T).

    A binary search per value: used on small tables only (bezier_lut), apply_lut maps whole patches.
    """
    B, T = xs.shape
    v = x.reshape(B, -1).clamp(0, 1).to(xs.dtype).contiguous()  # (B, M)
    slope = ys.diff(dim=1) / xs.diff(dim=1).clamp_min(torch.finfo(xs.dtype).tiny)  # (B, T-1)
    segment = (torch.searchsorted(xs.contiguous(), v, right=True) - 1).clamp(0, T - 2)  # (B, M)
    x0, y0, y1 = xs.gather(1, segment), ys.gather(1, segment), ys.gather(1, segment + 1)
    # Clamping to the segment's [y0, y1] keeps the map exactly monotone despite rounding.
    out = (y0 + (v - x0) * slope.gather(1, segment)).clamp(min=y0, max=y1)
    out = torch.where(v >= 1, 1.0, out)  # v = 1 falls past the last segment's end
    return out.reshape(x.shape).to(x.dtype)


def bezier_lut(points, num_points=LUT_SIZE):
    """The curve of bezier_curve on a uniform grid: lut[:, i] = curve(i / (T-1)), T = num_points.

    points: (B, 4) -> lut (B, T) non-decreasing, lut[:, 0] = 0, lut[:, -1] = 1. Built with a
    search over the knots, but only T values per patch; apply_lut then maps whole patches.
    """
    xs, ys = bezier_curve(points, num_points)  # (B, T) knots, uneven in x
    grid = torch.linspace(0, 1, num_points, device=points.device, dtype=points.dtype)
    grid = grid.expand(len(points), num_points)  # (B, T)
    lut = interp_knots(grid, xs, ys)  # (B, T)
    lut[:, 0], lut[:, -1] = 0, 1  # exact endpoints, also where knots repeat at 0 or 1
    return lut


def apply_lut(x, lut):
    """np.interp(x, linspace(0, 1, T), lut) per sample, by index arithmetic instead of a search.

    x: (B, ...) clamped to [0, 1]; lut: (B, T) non-decreasing -> (B, ...) of x's dtype, computed in
    lut's dtype. 0 -> lut[:, 0] and 1 -> lut[:, -1] exactly, and the map is exactly monotone.
    """
    B, T = lut.shape
    # Rise of each cell (B, T); cell T-1 holds only x = 1, so its rise is 0.
    slope = torch.cat([lut.diff(dim=1), torch.zeros_like(lut[:, :1])], dim=1)
    position = x.reshape(B, -1).to(lut.dtype).clamp(0, 1).mul_(T - 1)  # (B, V) in [0, T-1]
    cell = position.int()  # (B, V) floor, as position >= 0; int32 halves the index memory of int64
    frac = position.sub_(cell)  # (B, V) in [0, 1)
    # Flat (B*T,) tables and indices b*T + cell: one index_select per table for the whole batch.
    index = cell.add_(torch.arange(B, device=x.device, dtype=torch.int32)[:, None] * T)
    index = index.view(-1)                                                                # (B*V,)
    # As frac < 1, frac * slope rounds at least one float step below slope, more than slope's own
    # rounding error, so lut + frac * slope never passes the next cell's first value: monotone.
    out = frac.mul_(slope.reshape(-1).index_select(0, index).view(B, -1))
    out = out.add_(lut.reshape(-1).index_select(0, index).view(B, -1))  # (B, V)
    return out.reshape(x.shape).to(x.dtype)


def bezier_intensity(x, generator, prob=0.9, num_points=LUT_SIZE):
    """Sec. 2.1 non-linear intensity transform, each patch with probability prob.
    x: (B, C, X, Y, Z) -> (B, C, X, Y, Z)."""
    _check_batch(x)
    B = x.shape[0]
    lut_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    points = _rand(generator, B, 4, device=x.device).to(lut_dtype)  # two random control points
    apply = _rand(generator, B, device=x.device) < prob  # (B,)
    out = apply_lut(x, bezier_lut(points, num_points))
    return torch.where(apply[:, None, None, None, None], out, x)


# ----------------------------------------------------------------------------- vox2vec baseline
def _separable_blur(x, sigma, radius, axes=(0, 1, 2)):
    """Gaussian blur along the given spatial axes (0 = X, 1 = Y, 2 = Z), per-sample sigma in
    voxels, sigma: (B, len(axes)); a sigma of 0 leaves that axis unchanged (a one-hot kernel).
    x: (B, C, X, Y, Z) -> (B, C, X, Y, Z); one grouped conv3d per axis, borders replicated."""
    B, C = x.shape[:2]
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    h = x.reshape(1, B * C, *x.shape[2:])  # samples as channels: (1, B*C, X, Y, Z)
    for i, axis in enumerate(axes):
        s = sigma[:, i].to(x.dtype).clamp_min(1e-6)[:, None]  # (B, 1)
        kernel = torch.exp(-0.5 * (offsets / s) ** 2)  # (B, K); exp(-inf) = 0 off-centre at sigma 0
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, K)
        pad = [0, 0, 0, 0, 0, 0]
        pad[4 - 2 * axis], pad[5 - 2 * axis] = radius, radius  # F.pad lists the last axis first
        shape = [B * C, 1, 1, 1, 1]
        shape[2 + axis] = -1
        h = F.conv3d(F.pad(h, pad, mode="replicate"), kernel.view(shape), groups=B * C)
    return h.reshape(x.shape)


def _blur_xy(x, sigma, radius):
    """Gaussian blur in the axial (X, Y) plane as vox2vec, per-sample sigma (B,) in voxels."""
    return _separable_blur(x, torch.stack([sigma, sigma], 1), radius, axes=(0, 1))


def blur_or_sharpen(x, generator, prob=0.5, blur_sigma=(0.25, 1.5), sharpen_sigma=(0.5, 1.0),
                    sharpen_sigma_2=0.5, sharpen_alpha=(10.0, 30.0)):
    """vox2vec: with probability prob, blur or sharpen (50/50) in the axial plane.

    Blur: Gaussian, sigma ~ U(blur_sigma) voxels. Sharpen (MONAI GaussianSharpen, as vox2vec):
    b = blur(x, s1), out = b + alpha * (b - blur(b, s2)), s1 ~ U(sharpen_sigma),
    alpha ~ U(sharpen_alpha).
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
    radius_2 = int(4 * sharpen_sigma_2 + 0.5)
    reblurred = _blur_xy(blurred, torch.full_like(sigma, sharpen_sigma_2), radius_2)
    sharpened = blurred + alpha[:, None, None, None, None] * (blurred - reblurred)
    out = torch.where(blur[:, None, None, None, None], blurred, sharpened)
    return torch.where(apply[:, None, None, None, None], out, x).clamp(0, 1)


def gaussian_noise(x, generator, prob=0.5, max_std=30.0 / HU_WIDTH):
    """vox2vec: with probability prob, N(0, std^2) noise, std ~ U(0, 30 HU). (B, C, X, Y, Z)."""
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
    high = torch.where(apply, min_high + u[:, 2] * (1 - min_high), 1.0)
    high = high.to(x.dtype)[:, None, None, None, None]
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
