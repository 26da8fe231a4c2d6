"""MedContext (Gani et al. 2024, "MedContext: learning contextual cues for efficient volumetric
medical segmentation"): no pretraining stage; during supervised training a masked copy of each
patch also goes through the network (the student), and

    L = Seg(S(x), y) + Seg(S(M(x)), y) + beta * MSE(S(M(x)), T(x)),

where T is an exponential moving average of S (the teacher, no gradients) run on the clean
patch, so the student learns to fill in the masked organs in the output space.
M: --mc-mask-ratio of the patch's --mc-mask-block cells set to 0 (the value of air / padding
here), "cube" blocks or "column"s (a block as deep as the patch: one 2-D mask on every slice).
beta 0.5, ratio 0.5, teacher momentum 0.999 (demo 0.99: over 450 steps 0.999 would hardly move).

The clean and the masked batch go through the student as two batches, each with its own
BatchNorm statistics (one batch of both would train on mixed statistics that the clean-patch
re-estimation after training no longer matches), inside one forward call (TwoInputs) so that
DDP sees one forward per step. The teacher runs in train mode (batch statistics), as MoCo's key
encoder, its running statistics never being trained; the student is what is saved.

    python experiments/neighbours/medcontext.py --data demo --init random --out
    runs/medcontext-demo --train-cases 1
    python experiments/neighbours/medcontext.py --data demo --checkpoint
    runs/pretrain-demo/backbone.pt --out runs/mc-ours

Every finetune.py flag applies (it is finetune.py's loop with this step); writes the same
results.json and model_fold<k>.pt.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: the stage files
import finetune  # noqa: E402
import runtime  # noqa: E402
from loss import segmentation_loss  # noqa: E402
# noqa: E402
from experiments.neighbours.common import block_mask, ema_update, frozen_copy, mask_block_problem
# noqa: E402
from runtime import below_one, non_negative_float, open_fraction, positive_int, world_info

DEMO = dict(mc_mask_block=(4, 4, 2), mc_momentum=0.99)


def consistency_loss(student_logits, teacher_logits):
    """MSE between the student's logits on the masked input and the teacher's on the clean input;
    the teacher is a target (no gradient)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    return F.mse_loss(student_logits.to(dtype), teacher_logits.detach().to(dtype))


class TwoInputs(torch.nn.Module):
    """forward(a, b) -> (model(a), model(b)): two batches, each with its own BatchNorm statistics,
    in one call (DDP allows one forward per backward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, a, b):
        return self.model(a), self.model(b)


def mask_block(args):
    """The mask's block: --mc-mask-block, or as deep as the patch for "column"s."""
    block = tuple(args.mc_mask_block)
    return (*block[:2], args.patch_size[2]) if args.mc_mask_shape == "column" else block


def hooks(model, cfg, args, run, fold):
    """finetune.py's loop with MedContext's step: the student (model) runs on the clean and the
    masked batch (TwoInputs, what DDP wraps), the EMA teacher on the clean one; the teacher's EMA
    step follows the optimizer's."""
    teacher = frozen_copy(model)
    generator = torch.Generator(device=run.device).manual_seed(
        args.seed * 7919 + 17 + world_info()[0]
    )
    block = mask_block(args)

    def step(net, x, y, amp_dtype=None):
        masked = block_mask(
            x.shape, generator, args.mc_mask_ratio, block, x.device
        )  # (B, 1, X, Y, Z)
        masked = torch.where(masked, torch.zeros((), dtype=x.dtype, device=x.device), x)
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            clean, on_masked = net(x, masked)  # S(x), S(M(x)): (b, K, X, Y, Z) each
            with torch.no_grad():
                target = teacher(x)  # T(x)
        clean, on_masked = clean.float(), on_masked.float()
        return (
            segmentation_loss(clean, y)
            + segmentation_loss(on_masked, y)
            + args.mc_beta * consistency_loss(on_masked, target.float())
        )

    step.teacher = teacher
    return dict(
        net=TwoInputs(model),
        step=step,
        after_step=lambda m: ema_update(teacher, m, args.mc_momentum),
    )


def parse_args(argv=None):
    p = finetune.build_parser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--mc-beta", type=non_negative_float, default=0.5, help="weight of the consistency term"
    )
    p.add_argument(
        "--mc-mask-ratio", type=open_fraction, default=0.5, help="fraction of blocks masked"
    )
    p.add_argument(
        "--mc-mask-block",
        type=positive_int,
        nargs=3,
        default=(16, 16, 4),
        help="mask block (X, Y, Z) voxels",
    )
    p.add_argument(
        "--mc-mask-shape",
        choices=["cube", "column"],
        default="cube",
        help="blocks, or columns through all slices",
    )
    p.add_argument("--mc-momentum", type=below_one, default=0.999, help="teacher EMA momentum")
    return runtime.parse(p, argv, preset, refusals)


def preset(args):
    return {**finetune.preset(args), **(DEMO if runtime.is_demo(args) else {})}


def refusals(a):
    yield from finetune.refusals(a)
    yield mask_block_problem(
        "--mc-mask-block",
        mask_block(a),
        a.patch_size,
        a.mc_mask_ratio,
        "--mc-mask-ratio",
        given=a.mc_mask_block,
    )


def main(args):
    return finetune.main(args, hooks)


if __name__ == "__main__":
    runtime.cli(main, parse_args)
