"""Fine-tuning a pretrained FPN for segmentation (or training it from scratch), and prediction.

Implements the fine-tuning protocol of Kats et al. 2024, Sec. 3.2 (Table 3): a non-linear head
on the FPN (model.NonLinearHead; the paper does not specify it, ours is described in model.py);
the backbone is frozen for the first 15,000 steps, then its learning rate ramps exponentially
from 3e-5 to 3e-4 over 1,200 steps; 45,000 steps, batch 7, Adam 3e-4. `--init random` trains
the same network from scratch (no freezing, backbone at 3e-4 from step 0), the baseline of
Table 3. Evaluation, folds and label budgets are those of linear_probe.py.

Run it:
    python finetune.py --data demo --checkpoint runs/pretrain-demo/backbone.pt --out runs/ft-demo --train-cases 2
    python finetune.py --data demo --init random --out runs/scratch-demo --train-cases 2
    python finetune.py --data DATA_DIR --checkpoint backbone.pt --out DIR            # paper schedule
    python finetune.py --predict SCAN.nii.gz --checkpoint DIR/model_fold0.pt --output SEG.nii.gz

Training writes DIR/results.json (as linear_probe.py) and DIR/model_fold<k>.pt, the fine-tuned
network with everything --predict needs: its constructor arguments, the class names and the
preprocessing preset. --predict preprocesses the scan with that preset, segments it with a
sliding window and writes a label NIfTI on the scan's own grid (same shape and affine).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from linear_probe import (add_common_args, cross_validate, predict_volume, set_backbone_trainable, setup,
                          train_segmenter, world_info)
from data import load_dataset_json
from model import SegmentationModel
from pretrain import atomic_torch_save, pick_device
from preprocess import load_nifti, preprocess_arrays, save_on_original_grid

PAPER = dict(steps=45_000, batch_size=7, patch_size=(128, 128, 32), eval_patch_size=(128, 128, 32), lr=3e-4, folds=3,
             freeze_steps=15_000, ramp_steps=1_200, ramp_start_lr=3e-5)
# The demo keeps the paper's proportions: frozen for the first third, a short ramp.
DEMO = dict(steps=300, batch_size=2, patch_size=(48, 48, 16), eval_patch_size=(192, 176, 80), folds=3,
            lr=1e-3, freeze_steps=100, ramp_steps=30, ramp_start_lr=1e-4)  # lr: a short CPU budget


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
                           preset=meta["preset"], patch_size=list(cfg["eval_patch_size"]), fold=fold,
                           train_cases=list(train_ids)), path)


def load_model(path):
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "segmenter":
        raise ValueError(f"{path} is not a fine-tuned model from finetune.py (pass DIR/model_fold<k>.pt)")
    model = SegmentationModel(**ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def predict(scan, checkpoint, output, device, amp=True):
    """Segment one NIfTI scan; write the label map on the scan's own grid."""
    model, ckpt = load_model(checkpoint)
    model.to(device, memory_format=torch.channels_last_3d)
    image, affine = load_nifti(scan)
    spacing = ckpt["preset"].get("spacing")
    image01, _, _, meta = preprocess_arrays(image, affine, ckpt["modality"], spacing=spacing)
    labels = predict_volume(model, image01, tuple(ckpt["patch_size"]), device, amp=amp)   # (X, Y, Z)
    save_on_original_grid(labels.numpy().astype(np.uint8), meta, output)
    found = {ckpt["labels"][str(c)]: int((labels == c).sum()) for c in range(1, len(ckpt["labels"]))}
    print(f"wrote {output} (voxels per class on the preprocessed grid: {found})")
    return output


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
    cfg, device, data_dir, test_dir, names, plan = setup(args, PAPER, DEMO, "nonlinear", "finetune.py")
    if args.init == "random":   # from scratch: the whole network trains at lr from step 0
        cfg.update(freeze_steps=0, ramp_steps=0)

    def train_fold(model, fold, train_ids):
        train_segmenter(model, data_dir, train_ids, cfg, args, device, on_step=schedule(cfg), desc=f"fold {fold}")
        if world_info()[0] == 0:
            save_model(Path(args.out) / f"model_fold{fold}.pt", model, names, data_dir, cfg, fold, train_ids)

    return cross_validate(args, cfg, device, data_dir, test_dir, names, plan, "nonlinear", train_fold, "fine-tune")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, required=False)
    # Fine-tuning schedule (Sec. 3.2)
    p.add_argument("--freeze-steps", type=int, help="backbone frozen this long [15000; demo 100]")
    p.add_argument("--ramp-steps", type=int, help="exponential backbone-lr ramp [1200; demo 30]")
    p.add_argument("--ramp-start-lr", type=float, help="[3e-5; demo 1e-4]")
    # Prediction
    p.add_argument("--predict", help="SCAN.nii.gz to segment with --checkpoint FINETUNED.pt")
    p.add_argument("--output", help="SEG.nii.gz for --predict")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
