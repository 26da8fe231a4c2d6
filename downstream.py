"""What the downstream stages share (Sec. 3.2), as plain functions; each script's main shows its
own fold loop:

- backbone files: ours (backbone.pt) or the authors' released weights (vox2vec, hierarchical-
  dense-ssl), read through the one key map between their FPN3d's names and ours;
- the segmenter: a backbone file or a random initialisation, with a linear or non-linear head;
  freezing it for real;
- folds and label budgets: k-fold cross-validation or a fixed split, the first N of a fixed
  shuffle of the training cases;
- evaluation: sliding-window inference over whole held-out volumes, Dice per class, the results
  table (mean +- std over folds) and results.json;
- the flags both scripts take, and their presets.
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import DATA_SPLIT, list_cases, load_case, load_dataset_json, read_split
from loss import dice_per_class
from model import ARCHS, DEMO_ARCHS, FPN3d, SegmentationModel
from predict import predict_volume
from preprocess import resolve_data_dir
from runtime import (CHECKPOINT_VERSION, claim_output, is_demo, load_torch, non_negative_int, positive_int, save_json,
                     save_torch, setup_distributed, unwrap, world_info)


# ----------------------------------------------------------------------------- backbone files, ours and the authors'
# model.FPN3d computes the same function as the authors' FPN3d (vox2vec, hierarchical-dense-ssl),
# layer for layer; only the names differ (L = num_levels, k = L - 2 - l):
#     ours                                   theirs
#     stem.*                                 first_conv.*
#     encoder.{l}.{j}.body.{m}.*   (l < L-1) left_blocks.{l}.layers.{j}.layers.{m}.*
#     encoder.{L-1}.{j}.body.{m}.*           bottom_block.layers.{j}.layers.{m}.*
#     down.{l}.*                             down_blocks.{l}.1.*        (.0 is the max-pool)
#     lateral.{l}.*                          up_blocks.{k}.0.*          (.1 is the upsampling)
#     skip.{l}.*                             skip_blocks.{k}.*
#     decoder.{l}.{j}.body.{m}.*             right_blocks.{k}.layers.{j}.layers.{m}.*

def reference_key(key, num_levels):
    """Our FPN3d state-dict key -> the authors' key (the table above)."""
    top = num_levels - 1
    rules = [
        (r"stem\.(.+)", lambda m: f"first_conv.{m[1]}"),
        (r"encoder\.(\d+)\.(\d+)\.body\.(.+)", lambda m: (
            f"bottom_block.layers.{m[2]}.layers.{m[3]}" if int(m[1]) == top
            else f"left_blocks.{m[1]}.layers.{m[2]}.layers.{m[3]}")),
        (r"down\.(\d+)\.(.+)", lambda m: f"down_blocks.{m[1]}.1.{m[2]}"),
        (r"lateral\.(\d+)\.(.+)", lambda m: f"up_blocks.{top - 1 - int(m[1])}.0.{m[2]}"),
        (r"skip\.(\d+)\.(.+)", lambda m: f"skip_blocks.{top - 1 - int(m[1])}.{m[2]}"),
        (r"decoder\.(\d+)\.(\d+)\.body\.(.+)", lambda m: f"right_blocks.{top - 1 - int(m[1])}.layers.{m[2]}.layers.{m[3]}"),
    ]
    for pattern, replace in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return replace(m)
    raise KeyError(f"no reference name for {key!r}")


def key_map(config):
    """{our key: their key} for FPN3d(**config), built from the module itself (meta device)."""
    with torch.device("meta"):
        keys = FPN3d(**config).state_dict().keys()
    return {k: reference_key(k, config["num_levels"]) for k in keys}


def to_reference(state_dict, config):
    """Our FPN3d state dict -> the same tensors under the authors' names."""
    return {theirs: state_dict[ours] for ours, theirs in key_map(config).items()}


def from_reference(state_dict, config):
    """The authors' FPN3d state dict -> ours. KeyError if a key of either side is missing."""
    return {ours: state_dict[theirs] for ours, theirs in key_map(config).items()}


def layout_config(state_dict, stem, down):
    """(in_channels, base_channels, num_levels) of an FPN3d state dict, from its tensor shapes."""
    weight = state_dict[f"{stem}.weight"]                            # (C_0, C_in, 3, 3, 3)
    downs = {int(k.split(".")[1]) for k in state_dict if k.startswith(f"{down}.")}
    return dict(in_channels=int(weight.shape[1]), base_channels=int(weight.shape[0]), num_levels=len(downs) + 1)


def read_backbone_file(path, verbose=True):
    """A backbone of any supported kind -> (backbone_config, our state dict, info). Accepted: our
    backbone.pt (or the pretrain.py run folder holding it); a raw state dict in the authors' layout
    or ours; a Lightning checkpoint with or without the `backbone.` prefix (head keys are ignored
    and listed); any of these saved from DDP (`module.` prefix). ValueError, one line naming the
    file and what does not fit, for anything else."""
    path = Path(path)
    if path.is_dir() and (path / "backbone.pt").is_file():
        path = path / "backbone.pt"
    ckpt = load_torch(path, "checkpoint")
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: holds a {type(ckpt).__name__}, not a state dict or checkpoint")
    if ckpt.get("kind") == "backbone":
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: a backbone.pt of format version {ckpt.get('version')} (this code reads "
                             f"{CHECKPOINT_VERSION}); re-run pretrain.py")
        info = dict(kind="backbone.pt (pretrain.py)", step=ckpt.get("step"), arch=ckpt.get("arch"), ignored=[],
                    method=(ckpt.get("pretrain_config") or {}).get("method"))
        config, state = ckpt["backbone_config"], ckpt["state_dict"]
        check_fits(path, "ours (model.FPN3d)", config, state)
        if verbose:
            print(f"{path}: {info['kind']}, method {info['method']}, step {info['step']}; FPN3d{tuple(config.values())} "
                  "(in_channels, base_channels, num_levels)")
        return config, state, info
    if "kind" in ckpt or "model" in ckpt and "optimizer" in ckpt:
        what = {"segmenter": "a fine-tuned model (finetune.py)"}.get(ckpt.get("kind"), "a resumable checkpoint.pt")
        raise ValueError(f"{path} is {what}, not a backbone file; pass a pretrain.py run folder or its backbone.pt")
    state, kind = (ckpt["state_dict"], "Lightning checkpoint") if isinstance(ckpt.get("state_dict"), dict) \
        else (ckpt, "raw state_dict")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors (keys {list(state)[:5]})")
    if state and all(k.startswith("module.") for k in state):
        state, kind = {k[len("module."):]: v for k, v in state.items()}, kind + ", DDP `module.` prefix"
    ignored = []
    if any(k.startswith("backbone.") for k in state):
        ignored = sorted(k for k in state if not k.startswith("backbone."))
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        kind += ", `backbone.` prefix"
    if "first_conv.weight" in state:
        layout, config = "reference (vox2vec / hierarchical-dense-ssl FPN3d)", layout_config(state, "first_conv", "down_blocks")
        names = set(key_map(config).values())
    elif "stem.weight" in state:
        layout, config = "ours (model.FPN3d)", layout_config(state, "stem", "down")
        names = set(key_map(config))
    else:
        raise ValueError(f"{path}: no FPN3d found (neither first_conv.weight nor stem.weight among keys "
                         f"{sorted(state)[:6]}...)")
    ignored += sorted(k for k in state if k not in names)       # heads without a prefix
    missing = sorted(names - set(state))
    if missing:
        raise ValueError(f"{path}: {layout} with {config} but {len(missing)} key(s) missing, e.g. {missing[:4]}")
    state = {k: v for k, v in state.items() if k in names}
    if layout.startswith("reference"):
        state = from_reference(state, config)
    check_fits(path, layout, config, state)
    info = dict(kind=f"{kind}, {layout}", step=None, arch=None, ignored=ignored)
    if verbose:
        print(f"{path}: {info['kind']}; FPN3d{tuple(config.values())} (in_channels, base_channels, num_levels); "
              f"ignored {len(ignored)} key(s)" + (f": {', '.join(ignored[:8])}{' ...' if len(ignored) > 8 else ''}"
                                                  if ignored else ""))
    return config, state, info


def check_fits(path, layout, config, state):
    """ValueError, one line, unless `state` (our names) has exactly FPN3d(**config)'s keys and shapes."""
    try:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in FPN3d(**config).state_dict().items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {layout} with an unusable configuration {config} ({e})") from None
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or extra:
        raise ValueError(f"{path}: {layout} with {config} but {len(missing)} key(s) missing (e.g. {missing[:3]}) "
                         f"and {len(extra)} unexpected (e.g. {extra[:3]})")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in shapes.items() if state[k].shape != s]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} tensor(s) do not fit FPN3d({config}), e.g. {wrong[:3]}")


def check_backbone_flags(args, config, source):
    """A backbone file decides the FPN (pretrain.py --init-from, --checkpoint here): a flag that
    contradicts it is refused, one line."""
    explicit = getattr(args, "explicit", ())
    for k in ("base_channels", "num_levels"):
        if k in explicit and getattr(args, k) != config[k]:
            raise ValueError(f"--{k.replace('_', '-')} {getattr(args, k)} contradicts {source} ({config[k]})")
    if "arch" in explicit:
        raise ValueError(f"--arch applies to --init random; {source} decides the architecture")


def init_from_file(args, cfg):
    """--init-from FILE (ours or the authors' released weights): the file decides the FPN's size
    (a contradicting --base-channels / --num-levels is refused). -> state dict or None."""
    if not args.init_from:
        return None
    config, state, _ = read_backbone_file(args.init_from)
    check_backbone_flags(args, config, args.init_from)
    cfg.update(base_channels=config["base_channels"], num_levels=config["num_levels"], init_from=str(args.init_from))
    return state


def save_backbone(path, model, cfg, step):
    """backbone.pt: the FPN alone with its configuration, what read_backbone_file reads (pretrain.py
    writes it)."""
    core = unwrap(model)
    save_torch(dict(version=CHECKPOINT_VERSION, kind="backbone", step=step,
                    backbone_config=dict(core.config["backbone_config"]), arch=cfg["arch"],
                    pretrain_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                    state_dict=core.backbone.state_dict()), path)



# ----------------------------------------------------------------------------- the segmenter

def build_segmenter(args, num_classes, head):
    """SegmentationModel from --checkpoint (architecture read from the file) or --init random."""
    if args.checkpoint:
        backbone_config, state, info = read_backbone_file(args.checkpoint, verbose=False)
        check_backbone_flags(args, backbone_config, args.checkpoint)
        model = SegmentationModel(backbone_config, num_classes, head=head)
        model.backbone.load_state_dict(state, strict=True)     # read_backbone_file checked every key and shape
    else:
        model = SegmentationModel(dict(in_channels=1, base_channels=args.base_channels, num_levels=args.num_levels),
                                  num_classes, head=head)
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
    """[(fold, train_ids, test_ids)]: k-fold cross-validation, one fixed --split, or --test-data."""
    train_all = list_cases(data_dir, labelled=True)
    if not train_all:
        raise ValueError(f"{data_dir}: no labelled cases")
    if args.split is not None:   # a fixed split instead of cross-validation: one "fold"
        split = read_split(data_dir / "split.json" if args.split == DATA_SPLIT else args.split, train_all)
        if not split[args.evaluate_on]:
            raise ValueError(f"--evaluate-on {args.evaluate_on}: the split's {args.evaluate_on!r} list is empty")
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


def prepare(args, head, script, batch_size=1, outputs=("results.json",)):
    """Shared start of linear_probe.py and finetune.py: every input problem (data, labels,
    checkpoint, output folder, device) as one clear line before any training; a finished result
    in --out is kept unless --force. -> (device, data_dir, test_dir, names, plan)."""
    try:
        if (args.checkpoint is None) == (args.init != "random"):
            raise ValueError("give exactly one of --checkpoint BACKBONE.pt (or a pretrain.py run folder) or --init random")
        data_dir = resolve_data_dir(args.data)
        test_dir = resolve_data_dir(args.test_data) if args.test_data else None
        names = label_names(data_dir)
        plan = plan_folds(args, data_dir, test_dir)
        build_segmenter(args, len(names), head)   # fail fast on a bad checkpoint
        rank, world, device = setup_distributed(args.device)
        if rank == 0:   # one run per folder: claimed before anything is written into it
            claim_output(args.out, script, outputs, args.force)
        if batch_size % world:
            raise ValueError(f"--batch-size {batch_size} is the global batch: it must split evenly over {world} processes")
    except ValueError as e:
        sys.exit(f"{script}: error: {e}")
    return device, data_dir, test_dir, names, plan


# ----------------------------------------------------------------------------- evaluation

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


def announce(title, args, cfg, device, amp_dtype):
    if world_info()[0] == 0:
        print(f"{title} on {world_info()[1]} x {device} ({'bf16 autocast' if amp_dtype else 'fp32'}): "
              f"{args.checkpoint or 'random init'}, config {json.dumps(cfg)}")


# ----------------------------------------------------------------------------- flags and presets

def add_common_args(p):
    """The flags linear_probe.py and finetune.py share."""
    # Data and protocol
    p.add_argument("--data", required=True, help="preprocessed DATA_DIR, or 'demo'")
    p.add_argument("--test-data", help="evaluate on this labelled set instead of cross-validation")
    p.add_argument("--out", required=True, help="folder for results.json (and models)")
    p.add_argument("--force", action="store_true", help="replace a finished result in --out")
    p.add_argument("--folds", type=positive_int, default=3, help="k of k-fold cross-validation")
    p.add_argument("--fold", type=non_negative_int, help="run only this fold [all]")
    p.add_argument("--train-cases", type=positive_int, help="label budget: training cases per fold [all]")
    p.add_argument("--draw", type=non_negative_int, default=0, help="which seeded draw of --train-cases cases")
    p.add_argument("--split", nargs="?", const=DATA_SPLIT, metavar="FILE",
                   help="a fixed split (train / val / test case ids) instead of cross-validation; without FILE, "
                        "DATA/split.json (preprocess.py --demo writes one)")
    p.add_argument("--evaluate-on", choices=["test", "val"], default="test", help="with --split: the cases scored")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--preset", choices=["paper", "demo"],
                   help="demo replaces some defaults with the script's DEMO [demo for --data demo, else paper]")
    # Backbone
    p.add_argument("--checkpoint", help="a pretrain.py run folder or its backbone.pt (or the authors' weights)")
    p.add_argument("--init", choices=["random"], help="random-init baseline instead of --checkpoint")
    p.add_argument("--arch", choices=sorted(ARCHS), default="balanced", help="architecture for --init random")
    p.add_argument("--base-channels", type=positive_int, default=ARCHS["balanced"]["base_channels"], help="for --init random")
    p.add_argument("--num-levels", type=positive_int, default=ARCHS["balanced"]["num_levels"], help="for --init random")
    # Evaluation and device
    p.add_argument("--eval-patch-size", type=positive_int, nargs=3, default=(128, 128, 32), help="sliding-window size at evaluation")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on a GPU, or on a CPU with bf16 instructions; fp32 elsewhere")


def presets(demo_values):
    """The presets of a downstream script: with the demo preset, its values (demo_values(first
    parse) -> dict) and the demo's random-init FPN (model.DEMO_ARCHS); else the paper's FPN."""
    def choose(first, explicit):
        demo = is_demo(first)
        return {**(DEMO_ARCHS if demo else ARCHS)[first.arch], **(demo_values(first) if demo else {})}
    return choose
