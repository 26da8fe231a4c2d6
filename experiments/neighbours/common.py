"""Pieces two neighbouring methods share (nothing of the paper's method uses them):
- block_mask, mask_block_problem: masked-image-modelling masks (mim.py; medcontext.py masks the
same way);
- RestorativeModel: the FPN with a reconstruction head (genesis.py, mim.py);
- ema_update / frozen_copy: an exponential-moving-average copy of a network (DenseCL's key
  encoder, MedContext's teacher).
"""

import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: the stage files
from model import FPN3d, reconstruction_head  # noqa: E402


def block_mask(shape, generator, ratio, block, device=None):
    """Masked-image-modelling mask: the patch tiled by a grid of block[0] x block[1] x block[2]
    voxel cells (from the corner; the last cell along an axis may be cut by the border), of which
    exactly round(ratio * cells) random cells per sample are masked. -> (B, 1, X, Y, Z) bool, True
    = masked. A block as deep as the patch gives columns (the same 2-D mask on every slice)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    batch, dims = shape[0], tuple(shape[-3:])
    block = [max(1, min(int(b), d)) for b, d in zip(block, dims)]
    cells = [-(-d // b) for d, b in zip(dims, block)]
    n = cells[0] * cells[1] * cells[2]
    k = int(round(ratio * n))
    order = torch.rand(batch, n, generator=generator, device=device).argsort(1)  # (B, n)
    masked = torch.zeros(batch, n, dtype=torch.bool, device=device).scatter(1, order[:, :k], True)
    masked = masked.view(batch, *cells)
    for a, b in enumerate(block):
        masked = masked.repeat_interleave(b, dim=1 + a)
    return masked[:, None, : dims[0], : dims[1], : dims[2]]


def mask_block_problem(flag, block, patch_size, ratio, ratio_flag, given=None):
    """Why a mask block cannot honour the asked ratio (a flag rule's message), or None: larger than
    the patch (block_mask would cut it to the patch), or so large that the patch holds too few
    blocks
    for round(ratio * blocks) / blocks to come within 0.1 of the ratio. `given`: the flag's value
    as the user wrote it, when `block` was derived from it."""
    shown = f"{flag} {' '.join(map(str, given if given is not None else block))}"
    patch = "x".join(map(str, patch_size))
    too_big = [f"{'XYZ'[a]} {b} > {p}" for a, (b, p) in enumerate(zip(block, patch_size)) if b > p]
    if too_big:
        return (f"{shown}: the block is larger than the {patch} patch ({', '.join(too_big)}); "
                "give a block that fits in the patch")
    cells = math.prod(-(-p // max(1, b)) for b, p in zip(block, patch_size))
    masked = round(ratio * cells) / cells
    if abs(masked - ratio) > 0.1:
        return (f"{shown} in a {patch} patch masks {masked:.0%} of it, not the {ratio:.0%} of "
                f"{ratio_flag}: give a smaller block")
    return None


class RestorativeModel(nn.Module):
    """FPN + reconstruction head: Models Genesis restores a corrupted patch, MIM predicts the
    masked voxels. With mask_token, the input's masked voxels are replaced by one learned
    intensity (SimMIM's learned mask token; for a 1-channel volume a scalar).
    forward(x (B, 1, X, Y, Z), mask (B, 1, X, Y, Z) bool or None) -> (B, 1, X, Y, Z)."""

    def __init__(self, backbone_config: dict, mask_token: bool = False):
        super().__init__()
        self.config = dict(backbone_config=dict(backbone_config), mask_token=mask_token)
        self.backbone = FPN3d(**backbone_config)
        self.reconstruction_head = reconstruction_head(self.backbone.channels[0])
        self.mask_token = nn.Parameter(torch.zeros(1)) if mask_token else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        if mask is not None:
            x = torch.where(mask, self.mask_token.to(x.dtype), x)
        return self.reconstruction_head(self.backbone(x)[0])


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameter by parameter (MoCo's key
    encoder, MedContext's teacher). Buffers (BatchNorm statistics) are the target's own."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy that takes no gradients (the EMA network's starting point)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin
