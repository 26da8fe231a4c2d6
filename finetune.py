"""Fine-tuning a pretrained FPN for segmentation (or training it from scratch).

Implements the fine-tuning protocol of Kats et al. 2024, Sec. 3.2 (Table 3): a non-linear head
on the FPN (model.NonLinearHead; the paper does not specify it, ours is described in model.py);
the backbone is frozen for the first 15,000 steps, then its learning rate ramps exponentially
from 3e-5 to 3e-4 over 1,200 steps; 45,000 steps, batch 7, Adam 3e-4. `--init random` trains
the same network from scratch (no freezing, backbone at 3e-4 from step 0), the baseline of
Table 3. Evaluation, folds and label budgets are downstream.py's, shared with linear_probe.py.

Deviation (default `--aug nnunet-like`): every training patch is augmented as nnU-Net does
(augment.supervised_augment: rotation, scaling, noise, blur, brightness, contrast, gamma,
mirroring). The paper and vox2vec train downstream without augmentation (`--aug none`); with one
or two labelled scans a network then learns their intensity scale and fails on other scanners.
Both arms of a comparison (--checkpoint and --init random) get the same setting.

Run it:
    python finetune.py --data demo --checkpoint runs/pretrain-demo/backbone.pt --out runs/ft-demo --train-cases 2
    python finetune.py --data demo --init random --out runs/scratch-demo --train-cases 2
    python finetune.py --data DATA_DIR --checkpoint backbone.pt --out DIR            # paper schedule

MedContext (Gani et al. 2024), `--medcontext`: the same training with a masked copy of each patch
through the network and an EMA teacher's consistency term (class MedContext); from scratch
(`--init random --medcontext`) or on top of a pretrained backbone (`--checkpoint ... --medcontext`).

Training writes DIR/results.json (as linear_probe.py) and DIR/model_fold<k>.pt, the fine-tuned
network with everything prediction needs: its constructor arguments, the class names, the
preprocessing preset and the augmentation it was trained with. Apply the models to new scans with
predict.py (`python predict.py -i SCANS -o OUT --model DIR`: all folds, mirroring);
`finetune.py --predict SCAN.nii.gz --checkpoint DIR/model_fold0.pt --output SEG.nii.gz` is kept as
an alias for one scan and one model.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data import LabelledPatchDataset, load_dataset_json
from downstream import (add_common_args, atomic_torch_save, cross_validate, pick_device, resolve,
                        set_backbone_trainable, setup, world_info)
from augment import SUPERVISED_KINDS, block_mask, supervised_augment
from loss import consistency_loss, segmentation_loss
from model import ema_update, frozen_copy
from predict import load_model, predict_scan
from preprocess import save_nifti

PAPER = dict(steps=45_000, batch_size=7, patch_size=(128, 128, 32), eval_patch_size=(128, 128, 32), lr=3e-4, folds=3,
             freeze_steps=15_000, ramp_steps=1_200, ramp_start_lr=3e-5,
             aug="nnunet-like",   # not the paper's (none); --aug none reproduces its protocol
             # MedContext (--medcontext; class MedContext): beta, mask ratio and shape, teacher momentum
             medcontext=False, mc_beta=0.5, mc_mask_ratio=0.5, mc_mask_block=(16, 16, 4), mc_mask_shape="cube",
             mc_momentum=0.999)
# The demo (phantom.DEMO_SCALE volumes, the downstream.DEMO_ARCHS network): chosen so that
# training from scratch on all demo training cases segments every class (mean Dice >= 0.8) in
# under 3 minutes per fold on 2 CPU cores: 450 steps of two 32 x 32 x 16 patches (~0.33 s a
# step), Adam at 2e-3 (the paper's 3e-4 is tuned for 45,000 steps). It keeps the paper's
# proportions: frozen for the first third, then a short exponential ramp.
DEMO = dict(steps=450, batch_size=2, patch_size=(32, 32, 16), eval_patch_size=(96, 96, 48), folds=3,
            lr=2e-3, freeze_steps=150, ramp_steps=40, ramp_start_lr=2e-4,
            mc_mask_block=(4, 4, 2), mc_momentum=0.99)   # 450 steps: at 0.999 the teacher would hardly move


BN_BATCHES = 100  # training batches over which BatchNorm statistics are re-estimated after training

# ----------------------------------------------------------------------------- training

class MedContext:
    """MedContext (Gani et al. 2024, "MedContext: learning contextual cues for efficient
    volumetric medical segmentation"), `--medcontext`: no pretraining stage; during supervised
    training a masked copy of each patch also goes through the network (the student), and

        L = Seg(S(x), y) + Seg(S(M(x)), y) + beta * MSE(S(M(x)), T(x)),

    where T is an exponential moving average of S (the teacher, no gradients) run on the clean
    patch, so the student learns to fill in the masked organs in the output space.
    M: --mc-mask-ratio of the patch's --mc-mask-block cells set to 0 (the value of air / padding
    here), "cube" blocks or "column"s (a block as deep as the patch: one 2-D mask repeated on
    every slice). The clean and the masked batch go through the student as two batches (each
    with its own BatchNorm statistics; one batch of both would train the network on mixed
    statistics that the clean-patch re-estimation after training, reestimate_batchnorm, then
    no longer matches), inside one forward call (TwoInputs) so that DDP sees one forward per
    step. The teacher runs in train mode (batch statistics) like MoCo's key encoder, as its
    running statistics are never trained; the student is what is saved and evaluated."""

    def __init__(self, model, cfg, seed, device):
        self.cfg = cfg
        self.teacher = frozen_copy(model)
        self.generator = torch.Generator(device=device).manual_seed(seed * 7919 + 17 + world_info()[0])
        block = list(cfg["mc_mask_block"])
        if cfg["mc_mask_shape"] == "column":
            block[2] = cfg["patch_size"][2]
        self.block = tuple(block)

    def mask(self, x):
        """-> (B, 1, X, Y, Z) bool, True = masked."""
        return block_mask(x.shape, self.generator, self.cfg["mc_mask_ratio"], self.block, x.device)

    def loss(self, net, x, y, amp=False):
        """Forward and loss of one batch x (b, 1, X, Y, Z), y (b, X, Y, Z) -> scalar."""
        masked = torch.where(self.mask(x), torch.zeros((), dtype=x.dtype, device=x.device), x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            clean, on_masked = net(x, masked)              # S(x), S(M(x)): (b, K, X, Y, Z) each
            with torch.no_grad():
                target = self.teacher(x)                   # T(x)
        clean, on_masked = clean.float(), on_masked.float()
        return (segmentation_loss(clean, y) + segmentation_loss(on_masked, y)
                + self.cfg["mc_beta"] * consistency_loss(on_masked, target.float()))

    def update(self, model):
        """The teacher's EMA step, after the optimizer's."""
        ema_update(self.teacher, model, self.cfg["mc_momentum"])


class TwoInputs(torch.nn.Module):
    """forward(a, b) -> (model(a), model(b)): two batches, each with its own BatchNorm statistics,
    in one call (DDP allows one forward per backward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, a, b):
        return self.model(a), self.model(b)


def train_segmenter(model, data_dir, train_ids, cfg, args, device, on_step=None, desc="train"):
    """The downstream training loop. `on_step(step, model, optimizer)` applies schedules (finetune.py).

    Under torchrun, --batch-size is the global batch: rank r reads items (s * W + r) * b + j of a
    dataset whose item i is a fixed function of (seed, i), so W processes see exactly the
    batches of one. DDP averages the gradients; it is re-wrapped when a schedule changes which
    parameters train (DDP fixes that set when it is built), e.g. when finetune.py unfreezes."""
    rank, world = world_info()
    b = cfg["batch_size"] // world
    dataset = LabelledPatchDataset(data_dir, train_ids, patch_size=cfg["patch_size"],
                                   length=cfg["steps"] * cfg["batch_size"], seed=args.seed)
    order = [(s * world + rank) * b + j for s in range(cfg["steps"]) for j in range(b)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=b, sampler=order,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    optimizer = make_optimizer(model, cfg["lr"])
    if device.type == "cpu":
        torch.set_flush_denormal(True)   # denormal activations slowed CPU steps by up to 1.5x (measured)
    amp = device.type == "cuda" and args.amp
    losses = torch.zeros((), device=device)
    # Every patch draws its own augmentation from one seeded stream on the training device (per rank).
    aug_generator = torch.Generator(device=device).manual_seed(args.seed * 7919 + 29 + rank)
    medcontext = MedContext(model, cfg, args.seed, device) if cfg.get("medcontext") else None
    # what one forward call runs (DDP wraps it): the model, or for MedContext the model on both inputs
    runner = TwoInputs(model) if medcontext is not None else model
    net, trains = runner, None
    bar = tqdm(loader, total=cfg["steps"], desc=desc, dynamic_ncols=True, leave=False, disable=rank != 0)
    for step, batch in enumerate(bar):
        if on_step is not None:
            on_step(step, model, optimizer)
        if world > 1 and trains != (now := tuple(p.requires_grad for p in model.parameters())):
            trains = now
            net = torch.nn.parallel.DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)
        x = batch["image"].to(device, non_blocking=True)   # (b, 1, X, Y, Z)
        y = batch["label"].to(device, non_blocking=True)   # (b, X, Y, Z)
        x, y = supervised_augment(x, y, aug_generator, cfg["aug"])
        x = x.contiguous(memory_format=torch.channels_last_3d)
        if medcontext is not None:
            loss = medcontext.loss(net, x, y, amp)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x)                            # (b, K, X, Y, Z)
            loss = segmentation_loss(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if medcontext is not None:
            medcontext.update(model)
        losses += loss.detach()
        if (step + 1) % 25 == 0:
            bar.set_postfix(loss=f"{losses.item() / 25:.3f}")
            losses.zero_()
    return model


def make_optimizer(model, lr):
    """Adam over the head, plus a separate (possibly frozen) group for the backbone."""
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [dict(params=head, lr=lr, name="head"),
              dict(params=list(model.backbone.parameters()), lr=lr, name="backbone")]
    return torch.optim.Adam(groups, lr=lr)


@torch.no_grad()
def reestimate_batchnorm(model, data_dir, train_ids, cfg, device, seed, batches=BN_BATCHES):
    """Replace every BatchNorm's running statistics by their plain average over `batches`
    batches of training patches, with the weights fixed ("precise BN", Wu & Johnson 2021).

    Why: BatchNorm's running statistics are an exponential average (momentum 0.1) over the last
    few dozen training batches of two small patches, taken while the weights were still moving.
    On the demo that left one fold of a from-scratch run at 0.168 mean Dice in eval mode although
    its training loss was as low as the other folds'; re-estimating the statistics of the same
    trained weights gave 0.874 (README, "Results")."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                     # cumulative average instead of an exponential one
    dataset = LabelledPatchDataset(data_dir, train_ids, patch_size=cfg["patch_size"],
                                   length=batches * cfg["batch_size"], seed=seed)
    model.train()
    for b in range(batches):
        items = [dataset[b * cfg["batch_size"] + j] for j in range(cfg["batch_size"])]
        x = torch.stack([it["image"] for it in items]).to(device).contiguous(memory_format=torch.channels_last_3d)
        model(x)                              # (b, 1, X, Y, Z): only the statistics change
    for m in norms:
        m.momentum = 0.1
    return model.train(was_training)


def backbone_lr(step, cfg):
    """Sec. 3.2: 0 while frozen, then exponential from ramp_start_lr to lr over ramp_steps."""
    t = step - cfg["freeze_steps"]
    if t < 0:
        return 0.0
    if t >= cfg["ramp_steps"]:
        return cfg["lr"]
    return cfg["ramp_start_lr"] * (cfg["lr"] / cfg["ramp_start_lr"]) ** (t / cfg["ramp_steps"])


def schedule(cfg):
    def on_step(step, model, optimizer):
        lr = backbone_lr(step, cfg)
        trainable = lr > 0
        if any(p.requires_grad for p in model.backbone.parameters()) != trainable:
            set_backbone_trainable(model, trainable)
        for group in optimizer.param_groups:
            if group["name"] == "backbone":
                group["lr"] = lr
    return on_step


def save_model(path, model, names, data_dir, cfg, fold, train_ids):
    meta = load_dataset_json(data_dir)
    atomic_torch_save(dict(kind="segmenter", version=1, model_config=model.config, state_dict=model.state_dict(),
                           labels={str(k): v for k, v in names.items()}, modality=meta["modality"],
                           preset=meta["preset"], patch_size=list(cfg["eval_patch_size"]), aug=cfg["aug"], fold=fold,
                           train_cases=list(train_ids)), path)


def check_output(scan, output):
    """Refuse, before any work, an output that would replace the scan or cannot be written."""
    scan, output = Path(scan), Path(output)
    if not output.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"--output {output}: needs a .nii or .nii.gz name")
    if not output.parent.is_dir():
        raise ValueError(f"--output {output}: folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK):
        raise ValueError(f"--output {output}: folder {output.parent} is not writable")
    if scan.exists() and output.exists() and output.resolve() == scan.resolve():
        raise ValueError(f"--output {output} is the scan itself: it would be replaced by the mask")


def predict(scan, checkpoint, output, device, amp=True):
    """--predict, kept for earlier command lines: one scan, one model, no mirroring, to one file.
    predict.py is the tool (folders, fold ensembles, mirroring, probabilities)."""
    check_output(scan, output)
    model, ckpt = load_model(checkpoint)
    model.to(device, memory_format=torch.channels_last_3d)
    _, labels, meta = predict_scan(scan, [model], [ckpt], device, amp=amp)
    save_nifti(labels, meta["original_affine"], output)
    found = {ckpt["labels"][str(c)]: int((labels == c).sum()) for c in range(1, len(ckpt["labels"]))}
    print(f"wrote {output} (voxels per class on the scan's grid: {found})")
    return output


def check_medcontext(args, cfg):
    stray = [k for k in PAPER if k.startswith("mc_") and getattr(args, k) is not None]
    if stray and not cfg["medcontext"]:
        sys.exit(f"finetune.py: error: {', '.join('--' + k.replace('_', '-') for k in stray)} without --medcontext")
    if cfg["medcontext"] and not (0 < cfg["mc_mask_ratio"] < 1 and 0 <= cfg["mc_momentum"] < 1 and cfg["mc_beta"] >= 0):
        sys.exit(f"finetune.py: error: --medcontext needs 0 < --mc-mask-ratio < 1, 0 <= --mc-momentum < 1 and "
                 f"--mc-beta >= 0 (got {cfg['mc_mask_ratio']}, {cfg['mc_momentum']}, {cfg['mc_beta']})")


def main(args):
    if args.predict:
        try:
            if not (args.checkpoint and args.output):
                raise ValueError("--predict needs --checkpoint FINETUNED.pt and --output SEG.nii.gz")
            return predict(args.predict, args.checkpoint, args.output, pick_device(args.device), args.amp)
        except ValueError as e:
            sys.exit(f"finetune.py: error: {e}")
    if not args.data or not args.out:
        sys.exit("finetune.py: error: training needs --data and --out (or use --predict)")
    check_medcontext(args, resolve(args, PAPER, DEMO))      # before setup makes the output folder
    cfg, device, data_dir, test_dir, names, plan = setup(args, PAPER, DEMO, "nonlinear", "finetune.py")
    if args.init == "random":   # from scratch: the whole network trains at lr from step 0
        cfg.update(freeze_steps=0, ramp_steps=0)

    def train_fold(model, fold, train_ids):
        if args.evaluate_saved:   # the trained weights of an earlier run of the same command
            saved, ckpt = load_model(Path(args.out) / f"model_fold{fold}.pt")
            if ckpt["train_cases"] != list(train_ids):
                sys.exit(f"finetune.py: error: {args.out}/model_fold{fold}.pt was trained on other cases")
            model.load_state_dict(saved.state_dict())
        else:
            train_segmenter(model, data_dir, train_ids, cfg, args, device, on_step=schedule(cfg), desc=f"fold {fold}")
        reestimate_batchnorm(model, data_dir, train_ids, cfg, device, seed=args.seed + 1000 + fold)
        if world_info()[0] == 0:
            save_model(Path(args.out) / f"model_fold{fold}.pt", model, names, data_dir, cfg, fold, train_ids)

    return cross_validate(args, cfg, device, data_dir, test_dir, names, plan, "nonlinear", train_fold, "fine-tune")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, required=False)
    # Fine-tuning schedule (Sec. 3.2)
    p.add_argument("--freeze-steps", type=int, help="backbone frozen this long [15000; demo 150]")
    p.add_argument("--ramp-steps", type=int, help="exponential backbone-lr ramp [1200; demo 40]")
    p.add_argument("--ramp-start-lr", type=float, help="[3e-5; demo 2e-4]")
    p.add_argument("--aug", choices=SUPERVISED_KINDS, default="nnunet-like",
                   help="augmentation of every training patch (augment.supervised_augment): nnU-Net's "
                        "spatial + intensity defaults; 'none' is the paper's protocol. Applies to --init random too")
    p.add_argument("--evaluate-saved", action="store_true",
                   help="no training: take OUT/model_fold<k>.pt of an earlier run of this command, "
                        "re-estimate its BatchNorm statistics and evaluate it again")
    # MedContext (class MedContext)
    p.add_argument("--medcontext", action="store_true", default=None,
                   help="add MedContext's masked-student / EMA-teacher consistency to the training")
    p.add_argument("--mc-beta", type=float, help="weight of the consistency term [0.5]")
    p.add_argument("--mc-mask-ratio", type=float, help="fraction of blocks masked [0.5]")
    p.add_argument("--mc-mask-block", type=int, nargs=3, help="mask block (X, Y, Z) voxels [16 16 4; demo 4 4 2]")
    p.add_argument("--mc-mask-shape", choices=["cube", "column"], help="blocks, or columns through all slices [cube]")
    p.add_argument("--mc-momentum", type=float, help="teacher EMA momentum [0.999; demo 0.99]")
    # Prediction
    p.add_argument("--predict", help="SCAN.nii.gz to segment with --checkpoint FINETUNED.pt (one model, "
                                    "no mirroring; predict.py does folders, fold ensembles and mirroring)")
    p.add_argument("--output", help="SEG.nii.gz for --predict")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
