"""3D FPN backbone, balanced voxel representation, pretraining heads and segmentation heads
(Kats, Hirsch & Heinrich 2024, built on vox2vec, Goncharov et al. 2023):
- FPN3d (Sec. 2.2): a U-Net-like 3D feature pyramid network, pre-activation residual blocks,
  max-pool down, nearest up; the same function as the authors' FPN3d layer for layer (47,567,872
  parameters "balanced", 47,624,448 "vox2vec"), so their released weights load (weights.py).
  ARCHS: "balanced" = 32 base channels, 5 levels ("fewer levels, doubled channels"); "vox2vec" =
  16 base channels, 6 levels (the baseline).
- The balanced voxel representation (Sec. 2.2): every level projected to one width (32) and the
  vectors sampled at a voxel at every level concatenated (5 x 32 = 160 dims); arch="vox2vec"
  concatenates the raw levels (16 + 32 + ... + 512 = 1008 dims).
- Projection head (3-layer MLP to 128 dims, L2-normalised: Eq. 1's input) and reconstruction head
  (two convolutions on the finest level: Eq. 2), Sec. 2.3.
- LinearHead (the linear evaluation) and NonLinearHead (fine-tuning), Sec. 3.2.

Deviations from the authors' code, each on purpose: the per-level projections are registered
modules (the reference keeps them in a plain list: never trained or saved); the reconstruction
head has two convolutions as the paper says (the reference: one) and a raw output (a sigmoid's
flat ends slow MSE learning where much of a patch is air); the segmentation heads output a
background channel too (softmax, loss.py); NonLinearHead's layout is ours (the paper gives none).

Shapes: volumes (B, C, X, Y, Z) on the canonical RAS voxel axes; sampled voxels (N, C); voxel
coordinates (N, 4) = (batch index, x, y, z), int64. Level l of a pyramid is (B, C_l, X_l, Y_l,
Z_l) with X_l = ceil(X / 2**l) and C_l = base_channels * 2**l.
"""
import math
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = {
    "balanced": dict(base_channels=32, num_levels=5),  # Sec. 2.2: ours
    "vox2vec": dict(base_channels=16, num_levels=6),   # the vox2vec baseline
}
# The demo's networks (every stage's --preset demo): small enough to train in minutes on 2 CPU
# cores; the baseline keeps one more level and half the channels, as in ARCHS.
DEMO_ARCHS = {
    "balanced": dict(base_channels=16, num_levels=4),
    "vox2vec": dict(base_channels=8, num_levels=5),
}
BLOCKS_PER_STAGE = 2  # residual blocks per encoder level and per decoder level
# Float32-sized copies of a pyramid level that one training step keeps for its backward pass (the
# inputs of the level's BatchNorms, ReLUs and convolutions): a lower estimate, what bf16 autocast
# keeps (fp32 keeps about twice as much; `python experiments/bench.py --memory` measures both).
SAVED_PER_LEVEL = 11


# ----------------------------------------------------------------------------- backbone

class ResBlock3d(nn.Module):
    """Pre-activation residual block: x + Conv3(ReLU(BN(Conv3(ReLU(BN(x)))))).
    (B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z); a 1x1x1 conv on the skip where C_in != C_out."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm3d(in_channels), nn.ReLU(inplace=True),
            nn.Conv3d(in_channels, out_channels, 3, padding=1),  # bias kept: the reference has it
            nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1))
        same = in_channels == out_channels
        self.skip = nn.Identity() if same else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def stage(channels: int) -> nn.Sequential:
    return nn.Sequential(*[ResBlock3d(channels, channels) for _ in range(BLOCKS_PER_STAGE)])


class FPN3d(nn.Module):
    """U-Net-like 3D feature pyramid network, the same function as the authors' FPN3d (their
    weights load through weights.py's key map; tests/test_weights.py checks a forward pass written
    from their layout). forward(x (B, C_in, X, Y, Z)) -> num_levels tensors, level l
    (B, base_channels * 2**l, ceil(X / 2**l), ...), for any input size. Stem: 3x3x3 conv C_in ->
    C_0. Encoder level l: max-pool 2 in ceil mode (l > 0), 1x1x1 conv C_{l-1} -> C_l, two residual
    blocks. Decoder level l (coarse to fine): the level above through a 1x1x1 conv to C_l,
    nearest-upsampled x2 and cropped, plus a 1x1x1 conv of the encoder's level l, then two residual
    blocks. Keeps channels_last_3d inputs channels-last; works under torch.autocast.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32, num_levels: int = 5):
        super().__init__()
        if num_levels < 1 or base_channels < 1:
            raise ValueError(f"model.py FPN3d: need num_levels >= 1 and base_channels >= 1, "
                             f"got {num_levels}, {base_channels}")
        self.in_channels, self.num_levels = in_channels, num_levels
        self.channels = [base_channels * 2 ** l for l in range(num_levels)]
        c = self.channels
        self.stem = nn.Conv3d(in_channels, c[0], 3, padding=1)
        self.down = nn.ModuleList(nn.Conv3d(c[l - 1], c[l], 1) for l in range(1, num_levels))
        self.encoder = nn.ModuleList(stage(c[l]) for l in range(num_levels))
        self.lateral = nn.ModuleList(nn.Conv3d(c[l + 1], c[l], 1) for l in range(num_levels - 1))
        self.skip = nn.ModuleList(nn.Conv3d(c[l], c[l], 1) for l in range(num_levels - 1))
        self.decoder = nn.ModuleList(stage(c[l]) for l in range(num_levels - 1))

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"model.py FPN3d: expected input (B, {self.in_channels}, X, Y, Z), "
                             f"got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        self.check_input(x)
        h = self.stem(x)                                   # (B, C_0, X, Y, Z)
        skips = []
        for l in range(self.num_levels):
            if l > 0:  # ceil mode: an odd size keeps its last voxel, (X_{l-1} + 1) // 2 = X_l
                h = self.down[l - 1](F.max_pool3d(h, 2, ceil_mode=True))   # (B, C_l, X_l, Y_l, Z_l)
            h = self.encoder[l](h)
            skips.append(h)
        pyramid = [h]
        for l in reversed(range(self.num_levels - 1)):
            # The 1x1x1 conv commutes with nearest upsampling (both act per voxel), so run it at
            # the coarse scale: the same result at 1/8 of the cost.
            up = F.interpolate(self.lateral[l](h), scale_factor=2, mode="nearest")  # (B, C_l, ...)
            up = crop_to(up, skips[l].shape[2:])                           # (B, C_l, X_l, Y_l, Z_l)
            h = self.decoder[l](up + self.skip[l](skips[l]))
            pyramid.insert(0, h)
        return pyramid


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """x (B, C, X', Y', Z') -> x[..., :X, :Y, :Z]: drop what upsampling added past an odd size."""
    return x[..., :size[0], :size[1], :size[2]]


def training_bytes(channels: Sequence[int], patch_size: Sequence[int], patches: int,
                   voxel_pairs: int = 0) -> int:
    """A lower estimate of the memory a training step through an FPN of `channels` per level holds
    for its backward pass: SAVED_PER_LEVEL float32 copies of every level of `patches` patches, and
    for InfoNCE over `voxel_pairs` pairs its (2N, 2N) logits thrice (logits, softmax, gradient)."""
    voxels = math.prod(patch_size)
    levels = sum(c * math.ceil(voxels / 8 ** l) for l, c in enumerate(channels))
    return 4 * (SAVED_PER_LEVEL * patches * levels + 3 * (2 * voxel_pairs) ** 2)


# ----------------------------------------------------------------------------- voxel sampling

def sample_voxels(pyramid: Sequence[torch.Tensor], coords: torch.Tensor) -> List[torch.Tensor]:
    """Feature vectors of N voxels at every pyramid level (Sec. 2.2). pyramid: level l
    (B, C_l, X/2**l, ...); coords: (N, 4) int64 = (b, x, y, z) in full-resolution voxels. ->
    [(N, C_l)]: level l read at (b, x>>l, y>>l, z>>l), the coarse voxel whose 2**l-cube holds the
    voxel, the geometry max-pool 2 down and nearest upsampling define. One gather per level."""
    if coords.dim() != 2 or coords.shape[1] != 4 or coords.is_floating_point():
        raise ValueError(f"model.py sample_voxels: coords must be integer (N, 4) = (b, x, y, z), "
                         f"got {coords.dtype} {tuple(coords.shape)}")
    b, x, y, z = coords.unbind(1)                                   # each (N,)
    out = []
    for l, feature in enumerate(pyramid):
        # (B, C, X_l, Y_l, Z_l) -> (B, X_l, Y_l, Z_l, C): a view, contiguous under channels_last_3d,
        # so each voxel's C channels are one contiguous row.
        out.append(feature.permute(0, 2, 3, 4, 1)[b, x >> l, y >> l, z >> l])  # (N, C_l)
    return out


# ----------------------------------------------------------------------------- pretraining

def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """3-layer projector (Sec. 2.3, after SimCLR): (N, in_dim) -> (N, out_dim)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim))


def reconstruction_head(channels: int) -> nn.Sequential:
    """Sec. 2.3: "two convolution layers" on the finest level (the reference: one 1x1x1 conv).
    Raw output, no sigmoid. (B, channels, X, Y, Z) -> (B, 1, X, Y, Z)."""
    return nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv3d(channels, 1, 1))


class PretrainModel(nn.Module):
    """FPN + voxel representation + projector + reconstruction head (Fig. 2).

    arch: "balanced" (Sec. 2.2: each level projected to projection_dim before concatenation) or
    "vox2vec" (raw levels concatenated). forward(x (B, 1, X, Y, Z), coords (N, 4)) ->
    (z (N, embedding_dim) float32, unit L2 norm (Eq. 1 input), recon (B, 1, X, Y, Z) raw, Eq. 2).
    """

    def __init__(self, backbone_config: dict, arch: str = "balanced", projection_dim: int = 32,
                 embedding_dim: int = 128, hidden_dim: int = 512):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"model.py PretrainModel: arch must be one of {sorted(ARCHS)}, "
                             f"got {arch!r}")
        self.config = dict(backbone_config=dict(backbone_config), arch=arch,
                           projection_dim=projection_dim, embedding_dim=embedding_dim,
                           hidden_dim=hidden_dim)
        self.arch = arch
        self.backbone = FPN3d(**backbone_config)
        channels = self.backbone.channels
        if arch == "balanced":
            # Sec. 2.2: every level to the same width. A 1x1x1 conv commutes with sampling, so it
            # is a Linear on the sampled (N, C_l) vectors instead of a conv over whole volumes.
            # Registered (ModuleList): the reference keeps these in a plain Python list, so they
            # are never trained or saved.
            self.projections = nn.ModuleList(nn.Linear(c, projection_dim) for c in channels)
            self.representation_dim = projection_dim * len(channels)
        else:
            self.projections = None
            self.representation_dim = sum(channels)
        self.projector = mlp(self.representation_dim, hidden_dim, embedding_dim)
        self.reconstruction_head = reconstruction_head(channels[0])

    def voxel_features(self, pyramid: Sequence[torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
        """Voxel representation j (Sec. 2.2): (N, 160) balanced, or (N, 1008) vox2vec's."""
        sampled = sample_voxels(pyramid, coords)                    # list of (N, C_l)
        if self.projections is not None:                            # list of (N, projection_dim)
            sampled = [proj(s) for proj, s in zip(self.projections, sampled)]
        return torch.cat(sampled, dim=1)

    def forward(self, x: torch.Tensor, coords: torch.Tensor):
        pyramid = self.backbone(x)
        h = self.projector(self.voxel_features(pyramid, coords))   # (N, embedding_dim)
        # Normalise in float32: under bf16 autocast the unit vectors feed exp(<z, z'> / 0.1).
        z = F.normalize(h.float(), dim=1)
        recon = self.reconstruction_head(pyramid[0])                # (B, 1, X, Y, Z)
        return z, recon


# ----------------------------------------------------------------------------- downstream heads

def upsample_sum(pyramid: Sequence[torch.Tensor], convs: nn.ModuleList) -> torch.Tensor:
    """sum_l upsample(conv_l(level l)) -> (B, C_out, X, Y, Z). The 1x1x1 convs run before
    upsampling (they commute), and nearest upsampling by 2**l reads level l at (x>>l, y>>l, z>>l),
    the same geometry as sample_voxels."""
    out = convs[0](pyramid[0])                                      # (B, C_out, X, Y, Z)
    for l in range(1, len(pyramid)):
        up = F.interpolate(convs[l](pyramid[l]), scale_factor=2 ** l, mode="nearest")
        out = out + crop_to(up, out.shape[2:])       # ceil-mode levels overhang odd sizes
    return out


class LinearHead(nn.Module):
    """Linear evaluation head (Sec. 3.2): each level -> its own 1x1x1 conv to num_classes,
    upsampled to full resolution and summed. pyramid -> logits (B, num_classes, X, Y, Z).

    Each level is first standardised per channel with fixed statistics of the training volumes
    (set_statistics; identity until set): an affine map of the features, as MAE's BatchNorm
    without affine parameters, so the head stays linear but the solver no longer depends on the
    features' scale. Nearest upsampling makes it exactly a linear classifier on the voxel
    representation pretraining trained (levels read as in sample_voxels). Bias only at the finest
    level, as in the reference: one per level would be the same constant summed five times.
    """

    def __init__(self, channels: Sequence[int], num_classes: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv3d(c, num_classes, 1, bias=l == 0)
                                   for l, c in enumerate(channels))
        for l, c in enumerate(channels):
            self.register_buffer(f"mean{l}", torch.zeros(c))
            self.register_buffer(f"std{l}", torch.ones(c))

    @torch.no_grad()
    def set_statistics(self, means: Sequence[torch.Tensor], stds: Sequence[torch.Tensor],
                       eps: float = 1e-6):
        for l, (m, s) in enumerate(zip(means, stds)):
            getattr(self, f"mean{l}").copy_(m)
            getattr(self, f"std{l}").copy_(s.clamp_min(eps))

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        s = (1, -1, 1, 1, 1)
        pyramid = [(f - getattr(self, f"mean{l}").view(s)) / getattr(self, f"std{l}").view(s)
                   for l, f in enumerate(pyramid)]
        return upsample_sum(pyramid, self.convs)

    def forward_voxels(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The same head on sampled voxels: features[l] (N, C_l) is level l read at each voxel's
        (x >> l, y >> l, z >> l) (model.sample_voxels' geometry) -> logits (N, num_classes), equal
        to forward(pyramid) at those voxels, since nearest upsampling reads level l there."""
        out = self.convs[0].bias                                        # (num_classes,)
        for l, (f, conv) in enumerate(zip(features, self.convs)):
            f = (f - getattr(self, f"mean{l}")) / getattr(self, f"std{l}")  # (N, C_l)
            out = out + f @ conv.weight.flatten(1).T              # (N, C_l) @ (C_l, num_classes)
        return out


class NonLinearHead(nn.Module):
    """Fine-tuning head (Sec. 3.2; the paper gives none, this layout is ours): per level a 1x1x1
    conv to `hidden` channels (the finest level's width), upsampled and summed as LinearHead, then
    BN -> ReLU -> Conv3^3 -> BN -> ReLU -> Conv1^3 to num_classes (the 3^3 conv also smooths the
    blocky coarse levels). pyramid -> logits (B, num_classes, X, Y, Z)."""

    def __init__(self, channels: Sequence[int], num_classes: int, hidden: int = None):
        super().__init__()
        hidden = hidden or channels[0]  # as wide as the finest level: 32 for the paper's FPN
        self.convs = nn.ModuleList(nn.Conv3d(c, hidden, 1, bias=l == 0)
                                   for l, c in enumerate(channels))
        self.refine = nn.Sequential(
            nn.BatchNorm3d(hidden), nn.ReLU(inplace=True),
            nn.Conv3d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm3d(hidden), nn.ReLU(inplace=True),
            nn.Conv3d(hidden, num_classes, 1))

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.refine(upsample_sum(pyramid, self.convs))


class SegmentationModel(nn.Module):
    """Backbone + segmentation head: forward(x (B, C_in, X, Y, Z)) -> logits (B, K, X, Y, Z).
    Rebuild from a checkpoint with SegmentationModel(**model.config)."""

    def __init__(self, backbone_config: dict, num_classes: int, head: str = "linear"):
        super().__init__()
        heads = {"linear": LinearHead, "nonlinear": NonLinearHead}
        if head not in heads:
            raise ValueError(f"model.py SegmentationModel: head must be one of {sorted(heads)}, "
                             f"got {head!r}")
        self.config = dict(backbone_config=dict(backbone_config), num_classes=num_classes,
                           head=head)
        self.backbone = FPN3d(**backbone_config)
        self.head = heads[head](self.backbone.channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
