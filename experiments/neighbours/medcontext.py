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

    python experiments/neighbours/medcontext.py --data demo --init random --out runs/medcontext-demo --train-cases 1
    python experiments/neighbours/medcontext.py --data demo --checkpoint runs/pretrain-demo/backbone.pt --out runs/mc-ours

Every finetune.py flag applies (it is finetune.py's loop with this step); writes the same
results.json and model_fold<k>.pt.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository: the stage files
import finetune  # noqa: E402
from loss import segmentation_loss  # noqa: E402
from experiments.neighbours.common import block_mask, check_mask_block, ema_update, frozen_copy  # noqa: E402
from runtime import momentum, non_negative_float, open_fraction, positive_int, world_info  # noqa: E402


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


class MedContext(finetune.Training):
    """MedContext: supervised training plus a masked student and an EMA teacher's consistency."""
    name, script = "medcontext", "experiments/neighbours/medcontext.py"
    demo = dict(mc_mask_block=(4, 4, 2), mc_momentum=0.99)
    keys = ("mc_beta", "mc_mask_ratio", "mc_mask_block", "mc_mask_shape", "mc_momentum")

    @staticmethod
    def add_arguments(p):
        p.add_argument("--mc-beta", type=non_negative_float, default=0.5, help="weight of the consistency term")
        p.add_argument("--mc-mask-ratio", type=open_fraction, default=0.5, help="fraction of blocks masked")
        p.add_argument("--mc-mask-block", type=positive_int, nargs=3, default=(16, 16, 4), help="mask block (X, Y, Z) voxels")
        p.add_argument("--mc-mask-shape", choices=["cube", "column"], default="cube",
                       help="blocks, or columns through all slices")
        p.add_argument("--mc-momentum", type=momentum, default=0.999, help="teacher EMA momentum")

    @staticmethod
    def check(cfg):
        block = cfg["mc_mask_block"] if cfg["mc_mask_shape"] == "cube" else (*cfg["mc_mask_block"][:2], cfg["patch_size"][2])
        check_mask_block("--mc-mask-block", block, cfg["patch_size"], cfg["mc_mask_ratio"], "--mc-mask-ratio",
                         given=cfg["mc_mask_block"])

    def __init__(self, model, cfg, seed, device):
        super().__init__(model, cfg, seed, device)
        self.teacher = frozen_copy(model)
        self.generator = torch.Generator(device=device).manual_seed(seed * 7919 + 17 + world_info()[0])
        block = list(cfg["mc_mask_block"])
        if cfg["mc_mask_shape"] == "column":
            block[2] = cfg["patch_size"][2]
        self.block = tuple(block)

    def runner(self, model):
        return TwoInputs(model)

    def mask(self, x):
        """-> (B, 1, X, Y, Z) bool, True = masked."""
        return block_mask(x.shape, self.generator, self.cfg["mc_mask_ratio"], self.block, x.device)

    def loss(self, net, x, y, amp_dtype=None):
        masked = torch.where(self.mask(x), torch.zeros((), dtype=x.dtype, device=x.device), x)
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            clean, on_masked = net(x, masked)              # S(x), S(M(x)): (b, K, X, Y, Z) each
            with torch.no_grad():
                target = self.teacher(x)                   # T(x)
        clean, on_masked = clean.float(), on_masked.float()
        return (segmentation_loss(clean, y) + segmentation_loss(on_masked, y)
                + self.cfg["mc_beta"] * consistency_loss(on_masked, target.float()))

    def after_step(self, model):
        """The teacher's EMA step, after the optimizer's."""
        ema_update(self.teacher, model, self.cfg["mc_momentum"])


def parse_args(argv=None):
    return finetune.parse_args(argv, MedContext)


def main(args):
    return finetune.main(args, MedContext)


if __name__ == "__main__":
    main(parse_args())
