"""The downstream protocol of Sec. 3.2 that linear_probe.py and finetune.py share, as plain
functions (each script's main shows its own fold loop):

- the segmenter: a backbone file (ours, or the authors' released formats, convert.py) or a
  random initialisation, with a linear or non-linear head; freezing it for real;
- folds and label budgets: k-fold cross-validation, the first N of a fixed shuffle;
- evaluation: sliding-window inference over whole held-out volumes, Dice per class, the results
  table (mean +- std over folds) and results.json;
- the flags both scripts take, and their demo preset applied in one place (parse_with_preset).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from convert import read_backbone_file
from data import list_cases, load_case, load_dataset_json, read_split, sliding_window_inference
from loss import dice_per_class, predict_labels
from model import ARCHS, DEMO_ARCHS, SegmentationModel
from preprocess import resolve_data_dir
from runtime import (claim_folder, explicit_flags, make_output_dir, non_negative_int, positive_int, save_json, setup_distributed,
                     world_info)


# ----------------------------------------------------------------------------- the segmenter

def random_backbone_config(args):
    return dict(in_channels=1, base_channels=args.base_channels, num_levels=args.num_levels)


def build_segmenter(args, num_classes, head):
    """SegmentationModel from --checkpoint (architecture read from the file) or --init random."""
    if args.checkpoint:
        backbone_config, state, info = read_backbone_file(args.checkpoint, verbose=False)
        check_backbone_flags(args, backbone_config)
        model = SegmentationModel(backbone_config, num_classes, head=head)
        try:   # strict: name exactly the keys that do not fit (MAE's habit)
            model.backbone.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{args.checkpoint}: weights do not fit the backbone it describes: {str(e)[:500]}") from None
    else:
        model = SegmentationModel(random_backbone_config(args), num_classes, head=head)
        info = dict(step=0, arch=args.arch)
    return model, info


def new_segmenter(args, num_classes, head, device, fold):
    """A fresh segmenter for one fold, seeded by (--seed, fold), on the device in train mode."""
    torch.manual_seed(args.seed + fold)
    model, info = build_segmenter(args, num_classes, head)
    return model.to(device, memory_format=torch.channels_last_3d).train(), info


def set_backbone_trainable(model, trainable, keep_batchnorm=False):
    """Freeze for real: no gradients, and eval mode so BatchNorm statistics stay as pretrained.
    keep_batchnorm: the BatchNorm layers stay trainable and in the model's mode (Lightning's train_bn)."""
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)
    model.backbone.train(trainable and model.training)
    if keep_batchnorm and not trainable:
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.requires_grad_(True)
                m.train(model.training)


# ----------------------------------------------------------------------------- folds

def label_names(data_dir):
    labels = load_dataset_json(data_dir).get("labels")
    if not labels:
        raise ValueError(f"{data_dir}/dataset.json has no labels: this stage needs labelled cases")
    return {int(k): v for k, v in labels.items()}


def split_folds(case_ids, folds, seed):
    """Shuffle once with the seed, then deal the cases into `folds` test sets."""
    if folds < 2 or folds > len(case_ids):
        raise ValueError(f"--folds {folds} needs 2 <= folds <= {len(case_ids)} labelled cases")
    order = np.random.default_rng(seed).permutation(len(case_ids))
    ids = [case_ids[i] for i in order]
    return [(sorted(c for j, c in enumerate(ids) if j % folds != k),
             sorted(c for j, c in enumerate(ids) if j % folds == k)) for k in range(folds)]


def plan_folds(args, data_dir, test_dir):
    """[(fold, train_ids, test_ids)] for cross-validation, or one split for --test-data."""
    train_all = list_cases(data_dir, labelled=True)
    if not train_all:
        raise ValueError(f"{data_dir}: no labelled cases")
    if args.split is not None:   # a fixed split instead of cross-validation: one "fold"
        split = read_split(args.split, train_all)
        plan = [(0, split["train"], split[args.evaluate_on])]
    elif test_dir is not None:
        if label_names(test_dir) != label_names(data_dir):
            raise ValueError(f"label sets differ: {data_dir}/dataset.json {label_names(data_dir)} vs "
                             f"{test_dir}/dataset.json {label_names(test_dir)}")
        plan = [(0, train_all, list_cases(test_dir, labelled=True))]
    else:
        plan = [(k, tr, te) for k, (tr, te) in enumerate(split_folds(train_all, args.folds, args.seed))]
    if args.fold is not None:
        if not 0 <= args.fold < len(plan):
            raise ValueError(f"--fold {args.fold} out of range 0..{len(plan) - 1}")
        plan = [plan[args.fold]]
    if args.train_cases is not None:   # label budget: the first N of a fixed shuffle of the fold's training cases
        smallest = min(len(tr) for _, tr, _ in plan)
        if not 1 <= args.train_cases <= smallest:
            raise ValueError(f"--train-cases {args.train_cases}: must be between 1 and {smallest}, the "
                             f"training cases of the smallest fold")
        rng = np.random.default_rng(args.seed + 1 + 7919 * args.draw)   # --draw k: another draw of the same size
        plan = [(k, sorted(rng.permutation(tr)[:args.train_cases].tolist()), te) for k, tr, te in plan]
    return plan


def prepare(args, head, script, batch_size=1):
    """Shared start of linear_probe.py and finetune.py: every input problem (data, labels,
    checkpoint, output folder, device) as one clear line before any training.
    -> (device, data_dir, test_dir, names, plan)."""
    try:
        if (args.checkpoint is None) == (args.init != "random"):
            raise ValueError("give exactly one of --checkpoint BACKBONE.pt or --init random")
        data_dir = resolve_data_dir(args.data)
        test_dir = resolve_data_dir(args.test_data) if args.test_data else None
        names = label_names(data_dir)
        plan = plan_folds(args, data_dir, test_dir)
        build_segmenter(args, len(names), head)   # fail fast on a bad checkpoint
        rank, world, device = setup_distributed(args.device)
        if rank == 0:   # one run per folder: claimed before anything is written into it
            make_output_dir(args.out)
            claim_folder(args.out, script)
        if batch_size % world:
            raise ValueError(f"--batch-size {batch_size} is the global batch: it must split evenly over {world} processes")
    except ValueError as e:
        sys.exit(f"{script}: error: {e}")
    return device, data_dir, test_dir, names, plan


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def volume_probabilities(model, image, patch_size, device, amp_dtype=None, overlap=0.5, batch_size=2):
    """Sliding-window softmax of one preprocessed volume: image (X, Y, Z) array or tensor ->
    (K, X, Y, Z) float32 on device, the Gaussian-weighted average of the overlapping tiles."""
    model.eval()
    x = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)[None]   # (1, X, Y, Z)
    # No window larger than the volume (the FPN takes any size).
    patch_size = tuple(min(p, s) for p, s in zip(patch_size, x.shape[1:]))

    def probabilities(tiles):                                                      # (b, 1, *patch)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            tiles = tiles.contiguous(memory_format=torch.channels_last_3d)
            return torch.softmax(model(tiles).float(), dim=1)                       # (b, K, *patch)

    return sliding_window_inference(x, probabilities, patch_size, overlap=overlap, batch_size=batch_size)


def predict_volume(model, image, patch_size, device, amp_dtype=None, overlap=0.5, batch_size=2):
    """Sliding-window segmentation of one preprocessed volume (X, Y, Z) -> labels (X, Y, Z) int64."""
    probs = volume_probabilities(model, image, patch_size, device, amp_dtype, overlap, batch_size)
    return predict_labels(probs[None])[0].cpu()                                     # (X, Y, Z)


def evaluate(model, data_dir, test_ids, num_classes, patch_size, device, amp_dtype=None):
    """Dice per foreground class for each test volume: (len(test_ids), num_classes - 1)."""
    rows = []
    for case_id in tqdm(test_ids, desc="evaluate", leave=False):
        case = load_case(data_dir, case_id)
        pred = predict_volume(model, case["image"], patch_size, device, amp_dtype)
        rows.append(dice_per_class(pred.numpy(), np.asarray(case["label"]), num_classes))
    return np.stack(rows)


def fold_mean(dice):
    """(cases, K-1) Dice -> the fold's mean: over classes per volume (absent classes ignored), then volumes."""
    return float(np.nanmean(np.nanmean(dice, axis=1)))


def summarise(fold_dice, names):
    """fold_dice: {fold: (cases, K-1) array}. Mean over classes per volume (NaN classes ignored),
    over volumes per fold; mean +- std over folds. Per class: mean over all volumes of all folds."""
    fold_means = {k: fold_mean(d) for k, d in fold_dice.items()}
    all_rows = np.concatenate(list(fold_dice.values()))
    per_class = {names[c + 1]: float(np.nanmean(all_rows[:, c])) if not np.all(np.isnan(all_rows[:, c])) else None
                 for c in range(all_rows.shape[1])}
    means = np.array(list(fold_means.values()))
    return dict(mean_dice=float(means.mean()), std_dice=float(means.std()), per_class=per_class,
                folds={str(k): v for k, v in fold_means.items()})


def print_table(title, results):
    print(f"\n{title}")
    for name, d in results["per_class"].items():
        print(f"  {name:<16} {'n/a' if d is None else f'{d:.3f}'}")
    print(f"  {'mean':<16} {results['mean_dice']:.3f} +- {results['std_dice']:.3f} "
          f"(over {len(results['folds'])} fold(s): {', '.join(f'{v:.3f}' for v in results['folds'].values())})")


def write_results(args, cfg, fold_dice, names, info, cases, started, title, extra=None):
    """OUT/results.json (the table, the arguments, the config, the cases of each fold) and the
    printed table. cases: {fold: (train_ids, test_ids)}."""
    plain = lambda d: {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    results = summarise(fold_dice, names)
    results.update(checkpoint=str(args.checkpoint) if args.checkpoint else None, init=args.init or "checkpoint",
                   backbone_step=info["step"], args=plain(vars(args)), config=plain(cfg),
                   seconds=round(time.time() - started, 1),
                   train_cases={str(k): list(v[0]) for k, v in cases.items()},
                   test_cases={str(k): list(v[1]) for k, v in cases.items()}, **(extra or {}))
    save_json(Path(args.out) / "results.json", results)
    print_table(f"{title}, {args.checkpoint or 'random init'}", results)
    return results


def announce(title, args, cfg, device):
    if world_info()[0] == 0:
        print(f"{title} on {world_info()[1]} x {device}: {args.checkpoint or 'random init'}, config {json.dumps(cfg)}")


# ----------------------------------------------------------------------------- flags

def add_common_args(p):
    """The flags linear_probe.py and finetune.py share."""
    # Data and protocol
    p.add_argument("--data", required=True, help="preprocessed DATA_DIR, or 'demo'")
    p.add_argument("--test-data", help="evaluate on this labelled set instead of cross-validation")
    p.add_argument("--out", required=True, help="folder for results.json (and models)")
    p.add_argument("--folds", type=positive_int, default=3, help="k of k-fold cross-validation")
    p.add_argument("--fold", type=non_negative_int, help="run only this fold [all]")
    p.add_argument("--train-cases", type=positive_int, help="label budget: training cases per fold [all]")
    p.add_argument("--draw", type=non_negative_int, default=0, help="which seeded draw of --train-cases cases")
    p.add_argument("--split", help="a fixed split file (train / val / test case ids) instead of cross-validation")
    p.add_argument("--evaluate-on", choices=["test", "val"], default="test", help="with --split: the cases scored")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--preset", choices=["paper", "demo"],
                   help="demo replaces some defaults with the script's DEMO [demo for --data demo, else paper]")
    # Backbone
    p.add_argument("--checkpoint", help="backbone.pt from pretrain.py (or the authors' weights, convert.py)")
    p.add_argument("--init", choices=["random"], help="random-init baseline instead of --checkpoint")
    p.add_argument("--arch", choices=sorted(ARCHS), default="balanced", help="architecture for --init random")
    p.add_argument("--base-channels", type=positive_int, default=ARCHS["balanced"]["base_channels"], help="for --init random")
    p.add_argument("--num-levels", type=positive_int, default=ARCHS["balanced"]["num_levels"], help="for --init random")
    # Evaluation and device
    p.add_argument("--eval-patch-size", type=positive_int, nargs=3, default=(128, 128, 32), help="sliding-window size at evaluation")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on a GPU, or on a CPU with bf16 instructions; fp32 elsewhere")


def parse_with_preset(p, argv, demo):
    """The paper's values are the parser's defaults; the demo preset (--preset demo, the default
    for --data demo) replaces those in `demo` and the random-init FPN's size (model.DEMO_ARCHS)."""
    first = p.parse_args(argv)
    is_demo = first.preset == "demo" or (first.preset is None and first.data == "demo")
    p.set_defaults(**(DEMO_ARCHS if is_demo else ARCHS)[first.arch], **(demo if is_demo else {}))
    args = p.parse_args(argv)
    args.explicit = explicit_flags(p, argv)
    return args


def check_backbone_flags(args, config):
    """With --checkpoint the file decides the FPN: a contradicting flag is refused, as pretrain.py
    --init-from refuses it."""
    explicit = getattr(args, "explicit", ())
    for k in ("base_channels", "num_levels"):
        if k in explicit and getattr(args, k) != config[k]:
            raise ValueError(f"--{k.replace('_', '-')} {getattr(args, k)} contradicts {args.checkpoint} ({config[k]})")
    if "arch" in explicit:
        raise ValueError(f"--arch applies to --init random; {args.checkpoint} decides the architecture")
