"""Models Genesis (Zhou et al. 2021) on our FPN: restore the original patch from its corruption.

The corruption (Sec. 2 of Models Genesis, the rates of its released configuration): local pixel
shuffling (p=0.5), the Bezier intensity curve (p=0.9), then with p=0.9 painting, which is
out-painting (p=0.8: keep one inner box of 3/7..4/7 of each side, noise elsewhere) or in-painting
(p=0.2). Shuffling, the curve and in-painting are the paper's Sec. 2.1 pieces (augment.py);
out-painting is the one our method does not use. Loss: MSE to the original, no contrastive term,
so this is Table 1's "L_r only" row with out-painting and Models Genesis' rates.
Adapted: our FPN + the paper's reconstruction head, our data, optimiser and budgets, not the
3D U-Net and schedule of Models Genesis.

    python experiments/neighbours/genesis.py --data demo --out runs/genesis-demo
    python experiments/neighbours/genesis.py --data DATA_DIR --out runs/genesis       # paper-scale
    settings

Every pretrain.py flag applies (data, network, optimisation, resume, torchrun); writes the same
backbone.pt for linear_probe.py and finetune.py.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: the stage files
import pretrain  # noqa: E402
import runtime  # noqa: E402
# noqa: E402
from augment import _check_batch, _rand, bezier_intensity, inpaint_mask, local_pixel_shuffle
from experiments.neighbours.common import RestorativeModel  # noqa: E402


def outpaint_box(shape, generator, device=None, keep_fraction=(3 / 7, 4 / 7)):
    """The inner box out-painting keeps: per sample one box with sides in [d*lo, d*hi] voxels,
    anywhere inside the patch. -> (B, 1, X, Y, Z) bool."""
    batch, dims = shape[0], tuple(shape[-3:])
    u_size = _rand(generator, batch, 3, device=device)
    u_start = _rand(generator, batch, 3, device=device)
    inside = None
    for a, d in enumerate(dims):
        low = max(1, int(round(d * keep_fraction[0])))
        high = max(low, int(round(d * keep_fraction[1])))
        size = (low + (u_size[:, a] * (high - low + 1)).long()).clamp_max(high)  # (B,)
        start = (u_start[:, a] * (d - size + 1)).long().minimum(d - size)  # (B,)
        coord = torch.arange(d, device=device)
        axis = (coord >= start[:, None]) & (coord < (start + size)[:, None])  # (B, d)
        view = [batch, 1, 1, 1]
        view[1 + a] = d
        inside = axis.view(view) if inside is None else inside & axis.view(view)
    return inside[:, None]


def local_outpaint(x, generator, keep_fraction=(3 / 7, 4 / 7)):
    """Out-painting: keep one random inner box, fill the rest with U[0, 1) noise.
    x: (B, C, X, Y, Z) -> (B, C, X, Y, Z)."""
    _check_batch(x)
    keep = outpaint_box(x.shape, generator, x.device, keep_fraction)
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.where(keep, x, noise)


def genesis_corrupt(
    x, generator, shuffle_prob=0.5, bezier_prob=0.9, paint_prob=0.9, outpaint_prob=0.8
):
    """Models Genesis' corruption. x: (B, C, X, Y, Z) -> (B, C, X, Y, Z)."""
    _check_batch(x)
    B, device = x.shape[0], x.device
    x = local_pixel_shuffle(x, generator, prob=shuffle_prob)
    x = bezier_intensity(x, generator, prob=bezier_prob)
    paint = _rand(generator, B, device=device) < paint_prob
    outward = _rand(generator, B, device=device) < outpaint_prob
    keep = outpaint_box(x.shape, generator, device)
    holes = inpaint_mask(x.shape, generator, device)
    replace = torch.where(outward.view(B, 1, 1, 1, 1), ~keep, holes) & paint.view(B, 1, 1, 1, 1)
    noise = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
    return torch.where(replace, noise, x)


def both_views(batch, device):
    """The 2B patches of a batch of B pairs, as independent patches (no pairs needed; reading the
    same pairs keeps every method on exactly the same data). -> (2B, 1, X, Y, Z)."""
    x = torch.cat([batch["patches_a"], batch["patches_b"]]).to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d)


def build_model(cfg, backbone_state=None):
    model = RestorativeModel(
        dict(in_channels=1, base_channels=cfg["base_channels"], num_levels=cfg["num_levels"])
    )
    if backbone_state is not None:
        model.backbone.load_state_dict(backbone_state)
    return model


def genesis_step(model, batch, cfg, generator, device, amp_dtype):
    """Models Genesis' step: restore the corrupted patch (MSE)."""
    x = both_views(batch, device)
    corrupted = genesis_corrupt(x, generator).contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        recon = model(corrupted)  # (2B, 1, X, Y, Z)
    l_r = torch.nn.functional.mse_loss(recon.float(), x.float())
    return l_r, dict(loss_recon=l_r)


def parse_args(argv=None):
    p = pretrain.build_parser(lambda p: None, description=__doc__.split("\n")[0])
    p.set_defaults(method="genesis", arch="balanced")
    return runtime.parse(p, argv, pretrain.preset, pretrain.refusals)


def main(args):
    return pretrain.main(args, build=build_model, step=genesis_step)


if __name__ == "__main__":
    runtime.cli(main, parse_args)
