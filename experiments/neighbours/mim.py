"""Masked image modelling on our FPN, SimMIM-style (Xie et al. 2022; for 3D CT / MRI: Chen et al.
2023, "Masked image modeling advances 3D medical image analysis"): --mask-ratio of the patch's
--mask-block cells are replaced by one learned value, the light reconstruction head predicts the
original voxels, L1 on the masked voxels only.

From a ViT to a CNN: a ViT drops (MAE) or replaces (SimMIM) whole tokens, so a masked token
carries nothing of its content. A CNN sees every voxel and convolutions mix neighbours, so
(1) masked voxels are replaced in the input, before the first convolution: no layer sees a
masked intensity; (2) the loss is on masked voxels only: on visible ones the identity would be
rewarded; (3) masks are blocks of several voxels at a high ratio (the 3D MIM paper's finding:
0.75, small blocks), so a masked voxel inside a block is several voxels from any visible one,
which a 3x3x3 convolution cannot bridge by interpolation. What still passes is the mask pattern
(the network knows where the holes are, as SimMIM's token does).

    python experiments/neighbours/mim.py --data demo --out runs/mim-demo
    python experiments/neighbours/mim.py --data DATA_DIR --out runs/mim --mask-ratio 0.75
    --mask-block 8 8 4

Every pretrain.py flag applies; writes the same backbone.pt for linear_probe.py and finetune.py.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: the stage files
import pretrain  # noqa: E402
import runtime  # noqa: E402
from runtime import open_fraction, positive_int  # noqa: E402
# noqa: E402
from experiments.neighbours.common import RestorativeModel, block_mask, mask_block_problem
from experiments.neighbours.genesis import both_views  # noqa: E402

DEMO = dict(mask_block=(4, 4, 2))  # 8 x 8 x 4 mm blocks: a 24 x 24 x 8 demo patch is 144 of them


def masked_l1(pred, target, mask):
    """SimMIM's loss: mean |pred - target| over the masked voxels only. pred, target: (B, C, X, Y,
    Z);
    mask: (B, 1, X, Y, Z) bool, True = masked. 0 if nothing is masked."""
    if pred.shape != target.shape or mask.shape[2:] != pred.shape[2:]:
        raise ValueError(
            f"masked_l1 got pred {tuple(pred.shape)}, target {tuple(target.shape)}, mask "
            f"{tuple(mask.shape)}"
        )
    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred, target = pred.to(dtype), target.to(dtype)
    weight = mask.to(pred.dtype).expand_as(pred)
    return ((pred - target).abs() * weight).sum() / weight.sum().clamp(min=1)


def build_model(cfg, backbone_state=None):
    model = RestorativeModel(
        dict(in_channels=1, base_channels=cfg["base_channels"], num_levels=cfg["num_levels"]),
        mask_token=True,
    )
    if backbone_state is not None:
        model.backbone.load_state_dict(backbone_state)
    return model


def mim_step(model, batch, cfg, generator, device, amp_dtype):
    """Masked image modelling's step: predict the masked blocks (masked L1)."""
    x = both_views(batch, device)
    mask = block_mask(
        x.shape, generator, cfg["mask_ratio"], cfg["mask_block"], device
    )  # (2B, 1, X, Y, Z)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        recon = model(x, mask)
    l1 = masked_l1(recon, x, mask)
    return l1, dict(loss_masked_l1=l1)


def add_arguments(p):
    p.add_argument(
        "--mask-ratio", type=open_fraction, default=0.75, help="fraction of blocks masked"
    )
    p.add_argument(
        "--mask-block", type=positive_int, nargs=3, default=(8, 8, 4), help="block (X, Y, Z) voxels"
    )


def parse_args(argv=None):
    p = pretrain.build_parser(add_arguments, description=__doc__.split("\n")[0])
    p.set_defaults(method="mim", arch="balanced")
    return runtime.parse(p, argv, preset, refusals)


def preset(args):
    return pretrain.preset(args, {**pretrain.DEMO, **DEMO})


def refusals(a):
    yield from pretrain.refusals(a)
    yield mask_block_problem(
        "--mask-block", a.mask_block, a.patch_size, a.mask_ratio, "--mask-ratio"
    )


def main(args):
    return pretrain.main(args, build=build_model, step=mim_step)


if __name__ == "__main__":
    runtime.cli(main, parse_args)
