"""What the downstream stages share (Sec. 3.2), as plain functions; each script's main shows its
own fold loop:

- the segmenter: a backbone file (weights.read_backbone) or a random initialisation, with a linear
  or non-linear head; freezing it for real;
- folds and label budgets: k-fold cross-validation, a fixed split or a separate test set, the first
  N of a fixed shuffle of the training cases; the shared start of the probe and fine-tuning;
- the sliding window (nnU-Net's Gaussian-weighted windows), which evaluation, the probe's pyramid
  cache and predict.py all use;
- evaluation: Dice per class on whole held-out volumes, the results table and results.json;
- the flags both scripts take, their rules and their presets.
"""
import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import runtime
from data import InputError, file_identity, list_cases, preprocessing, read_case, read_dataset
from data import read_split
from loss import dice_per_class, predict_labels
from model import ARCHS, DEMO_ARCHS, SegmentationModel
from runtime import non_negative_int, positive_int, world_info, write_json
from weights import check_backbone_flags, expand_stem, read_backbone

WEIGHT_FLOOR = 1e-3   # min Gaussian weight (of max 1): a voxel seen at window borders only counts


# ----------------------------------------------------------------------------- the segmenter

def new_segmenter(args, backbone, num_classes, head, device, fold, in_channels=1):
    """A fresh segmenter for one fold of `in_channels`-channel scans, seeded by (--seed, fold), on
    the device in train mode: `backbone` (read_backbone's (config, state, info); a single-channel
    one starts C channels through expand_stem) or, if None, --init random."""
    torch.manual_seed(args.seed + fold)
    if backbone is not None:
        config, state, info = backbone
        model = SegmentationModel(dict(config, in_channels=in_channels), num_classes, head=head)
        model.backbone.load_state_dict(expand_stem(state, in_channels, args.checkpoint),
                                       strict=True)
    else:
        model = SegmentationModel(dict(in_channels=in_channels, base_channels=args.base_channels,
                                       num_levels=args.num_levels), num_classes, head=head)
        info = dict(step=0, arch=args.arch, preprocessing=None)
    return model.to(device, memory_format=torch.channels_last_3d).train(), info


def batchnorms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def set_backbone_trainable(model, trainable, keep_batchnorm=False):
    """Freeze for real: no gradients, and eval mode so BatchNorm statistics stay as pretrained.
    keep_batchnorm: its BatchNorm layers stay trainable, in the model's mode (Lightning's train_bn).
    """
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)
    model.backbone.train(trainable and model.training)
    if keep_batchnorm and not trainable:
        for m in batchnorms(model.backbone):
            m.requires_grad_(True)
            m.train(model.training)


# ---------------------------------------------------------------------- folds, and the shared start

def split_folds(case_ids, folds, seed):
    """Shuffle once with the seed, then deal the cases into `folds` test sets."""
    if folds < 2 or folds > len(case_ids):
        raise InputError(f"--folds {folds} needs 2 <= folds <= {len(case_ids)} labelled cases")
    order = np.random.default_rng(seed).permutation(len(case_ids))
    ids = [case_ids[i] for i in order]
    return [(sorted(c for j, c in enumerate(ids) if j % folds != k),
             sorted(c for j, c in enumerate(ids) if j % folds == k)) for k in range(folds)]


def plan_folds(args, data_dir, info, test_info):
    """[(fold, train_ids, test_ids)]: k-fold cross-validation, one fixed --split, or --test-data."""
    train_all = list_cases(info, labelled=True)
    if not train_all:
        raise InputError(f"{data_dir}: no labelled cases")
    if args.split is not None:   # a fixed split instead of cross-validation: one "fold"
        split = read_split(data_dir / "split.json" if args.split is True else args.split, train_all)
        if not split[args.evaluate_on]:
            raise InputError(f"--evaluate-on {args.evaluate_on}: the split's {args.evaluate_on!r} "
                             "list is empty")
        plan = [(0, split["train"], split[args.evaluate_on])]
    elif args.test_data:
        plan = [(0, train_all, list_cases(test_info, labelled=True))]
    else:
        folds = split_folds(train_all, args.folds, args.seed)
        plan = [(k, tr, te) for k, (tr, te) in enumerate(folds)]
    if args.fold is not None:
        if not 0 <= args.fold < len(plan):
            raise InputError(f"--fold {args.fold} out of range 0..{len(plan) - 1}")
        plan = [plan[args.fold]]
    if args.train_cases is not None:   # a budget: the first N of a fixed shuffle of a fold's cases
        smallest = min(len(tr) for _, tr, _ in plan)
        if not 1 <= args.train_cases <= smallest:
            raise InputError(f"--train-cases {args.train_cases}: must be between 1 and {smallest}, "
                             "the training cases of the smallest fold")
        rng = np.random.default_rng(args.seed + 1 + 7919 * args.draw)   # --draw k: another draw
        plan = [(k, sorted(rng.permutation(tr)[:args.train_cases].tolist()), te)
                for k, tr, te in plan]
    return plan


def prepare(args, batch_size=1):
    """The shared start of linear_probe.py and finetune.py, every input problem one line before
    any training: --data and --test-data (their classes, channels and preprocessing compared),
    the folds, every case they read (data.read_case), the backbone file and the device ->
    namespace(device, data_dir, test_dir, names, plan, backbone, preprocessing, channels, inputs:
    the identity of each case and of the backbone file, for the run's record)."""
    data_dir, info = read_dataset(args.data)
    test_dir, test_info = read_dataset(args.test_data) if args.test_data else (data_dir, info)
    if not info.get("labels"):
        raise InputError(f"{data_dir / 'dataset.json'} has no labels: this stage needs labelled "
                         "cases")
    for what, ours, theirs in (("classes", info["labels"], test_info["labels"]),
                               ("preprocessing", preprocessing(info), preprocessing(test_info))):
        if ours != theirs:      # a model scored on data made otherwise than its training data
            raise InputError(f"--test-data {args.test_data}: its {what} ({theirs}) differ from "
                             f"--data {args.data}'s ({ours}): test on data made as the training "
                             "data")
    plan = plan_folds(args, data_dir, info, test_info)
    cases, inputs = {}, {}
    for _, train_ids, test_ids in plan:
        for folder, ids in ((data_dir, train_ids), (test_dir, test_ids)):
            for c in ids:
                case = read_case(folder, c, need_label=True, classes=info["labels"])
                cases.setdefault(folder, {})[c] = case["meta"].get("image_file", c)
                inputs[str(folder.resolve() / "cases" / c)] = case["identity"]
    trained = set(cases[data_dir].values())
    shared = sorted(c for c, scan in cases.get(test_dir, {}).items() if scan in trained)
    if args.test_data and (test_dir.resolve() == data_dir.resolve() or shared):
        raise InputError(f"--test-data {args.test_data} holds training cases of --data {args.data} "
                         f"({', '.join(shared[:5]) or 'the same folder'}): test on cases kept "
                         "apart")
    backbone, prep = None, preprocessing(info)
    if args.checkpoint:
        backbone = read_backbone(args.checkpoint, verbose=False)
        check_backbone_flags(args, backbone[0], args.checkpoint)
        expand_stem(backbone[1], len(prep["channels"]), args.checkpoint)
        print(compare_preprocessing(backbone[2]["preprocessing"], prep))
        inputs[str(Path(args.checkpoint).resolve())] = file_identity(backbone[2]["path"])
    device, rank, world = runtime.pick_device(args.device), 0, 1
    if "RANK" in os.environ:                                    # launched by torchrun
        rank, world, device = runtime.setup_distributed(device)
    runtime.split_batch(batch_size, world)
    names = {int(k): v for k, v in info["labels"].items()}
    return SimpleNamespace(device=device, data_dir=data_dir, test_dir=test_dir, names=names,
                           plan=plan, backbone=backbone, preprocessing=prep,
                           channels=len(prep["channels"]), inputs=inputs, rank=rank, world=world)


def compare_preprocessing(pretrained, labelled):
    """One line: how the backbone's pretraining corpus and the labelled set were preprocessed, and
    each difference named (transfer across them is a legitimate experiment: said, not refused)."""
    mm = lambda spacing: "x".join(f"{s:g}" for s in spacing) + " mm"
    show = lambda p: " + ".join(f"{c['name']} ({c['scheme']})"
                                for c in p["channels"]) + ", " + mm(p["spacing"])
    if pretrained is None:
        return ("preprocessing: the backbone file does not record its corpus' (the authors' "
                f"weights: their CT or MRI preset, README); this labelled set: {show(labelled)}")
    seen = {c["scheme"] for c in pretrained["channels"]}
    saw = " and ".join(s.upper() for s in sorted(seen))
    differences = [f"channel {c['name']} is {c['scheme'].upper()}-normalised, the backbone "
                   f"saw {saw}" for c in labelled["channels"] if c["scheme"] not in seen]
    if list(pretrained["spacing"]) != list(labelled["spacing"]):
        differences.append(f"another spacing ({mm(labelled['spacing'])} vs "
                           f"{mm(pretrained['spacing'])})")
    return (f"preprocessing: backbone {show(pretrained)}; labelled set {show(labelled)}: "
            + ("; ".join(differences) if differences else "the same"))


# ----------------------------------------------------------------------------- the sliding window

def tile_starts(shape, window, overlap=0.5):
    """Start tuples of `window` tiles covering every voxel of a (X,Y,Z) `shape`: step
    window*(1-overlap), last tile aligned to the end; an axis shorter than the window gets one
    tile at 0 (the caller pads)."""
    axes = []
    for dim, p in zip(shape, window):
        step = max(1, int(p * (1 - overlap)))
        starts = list(range(0, max(dim - p, 0) + 1, step))
        if starts[-1] < dim - p:
            starts.append(dim - p)
        axes.append(starts)
    return [(x, y, z) for x in axes[0] for y in axes[1] for z in axes[2]]


def gaussian_weights(window, device=None):
    """(X,Y,Z) importance map (nnU-Net): Gaussian with sigma = window/8 per axis, max 1, floored
    at WEIGHT_FLOOR so no voxel gets zero weight (a border-only voxel would divide by 0)."""
    w = 1.0
    for i, p in enumerate(window):
        x = torch.arange(p, dtype=torch.float32, device=device) - (p - 1) / 2
        g = torch.exp(-0.5 * (x / (p / 8)) ** 2)
        w = w * g.view([-1 if j == i else 1 for j in range(3)])
    return (w / w.max()).clamp_min(WEIGHT_FLOOR)


@torch.no_grad()
def sliding_window(image, predict_fn, window, overlap=0.5, batch_size=2, align=1):
    """A whole volume predicted window by window (Sec. 3.2 evaluation). image: (C, X, Y, Z) tensor;
    predict_fn maps (b, C, *window) -> a list of maps, map l (b, K_l, *window / 2**l) (an FPN's
    pyramid), or one tensor (b, K, *window). Windows start at multiples of `align` (2**(L-1) keeps
    every level of an L-level pyramid on its own grid) over the volume zero-padded to fit them; map
    l is the Gaussian-weighted average of the windows' maps, cut to ceil(size / 2**l). Returns the
    same structure, each map (K_l, ...) float32 on image.device. Autocast and eval mode: the
    caller's."""
    shape, m = tuple(image.shape[1:]), align
    window = tuple(max(m, int(w) // m * m) for w in window)
    padded = tuple(max(-(-s // m) * m, w) for s, w in zip(shape, window))
    image = F.pad(image,
                  [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]])
    starts = [tuple(t // m * m for t in st) for st in tile_starts(padded, window, overlap)]
    sums = norms = single = None
    for b in range(0, len(starts), batch_size):
        chunk = starts[b:b + batch_size]
        boxes = [(slice(None), *(slice(s, s + w) for s, w in zip(st, window))) for st in chunk]
        tiles = torch.stack([image[box] for box in boxes])
        out = predict_fn(tiles)
        single = torch.is_tensor(out)
        out = [out] if single else out
        if sums is None:
            sums = [torch.zeros((o.shape[1],) + tuple(p // 2 ** l for p in padded),
                                device=image.device)
                    for l, o in enumerate(out)]
            norms = [torch.zeros(s.shape[1:], device=image.device) for s in sums]
        for l, o in enumerate(out):
            w = gaussian_weights(o.shape[2:], image.device)                    # (w_l, ...)
            for st, pred in zip(chunk, o):
                box = tuple(slice(s // 2 ** l, s // 2 ** l + n) for s, n in zip(st, o.shape[2:]))
                sums[l][(slice(None),) + box] += pred.float() * w
                norms[l][box] += w
    maps = [(s / n)[(slice(None),) + tuple(slice(0, -(-d // 2 ** l)) for d in shape)]
            for l, (s, n) in enumerate(zip(sums, norms))]
    return maps[0] if single else maps


@torch.no_grad()
def volume_probabilities(model, image, window, device, amp_dtype=None, overlap=0.5):
    """Sliding-window softmax of one preprocessed volume: image (C, X, Y, Z) array or tensor ->
    (K, X, Y, Z) float32 on device."""
    model.eval()
    x = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)     # (C, X, Y, Z)
    window = tuple(min(w, s) for w, s in zip(window, x.shape[1:]))    # none larger than the volume

    def probabilities(tiles):                                                    # (b, C, *window)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(tiles.contiguous(memory_format=torch.channels_last_3d))
            return torch.softmax(logits.float(), dim=1)

    return sliding_window(x, probabilities, window, overlap=overlap)


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, data_dir, test_ids, num_classes, window, device, amp_dtype=None):
    """Dice per foreground class for each test volume: (len(test_ids), num_classes - 1)."""
    rows = []
    for case_id in tqdm(test_ids, desc="evaluate", leave=False):
        case = read_case(data_dir, case_id, need_label=True)
        pred = predict_labels(volume_probabilities(model, case["image"], window, device,
                                                   amp_dtype)[None])[0]
        rows.append(dice_per_class(pred.cpu().numpy(), np.asarray(case["label"]), num_classes))
    return np.stack(rows)


def fold_mean(dice):
    """(cases, K-1) Dice -> the fold's mean: over the classes of each volume (absent ones ignored),
    then the volumes."""
    return float(np.nanmean(np.nanmean(dice, axis=1)))


def summarise(fold_dice, names):
    """fold_dice: {fold: (cases, K-1) array}. Mean over classes per volume (NaN classes ignored),
    over volumes per fold; mean +- std over folds. Per class: mean over all volumes of all folds."""
    fold_means = {k: fold_mean(d) for k, d in fold_dice.items()}
    all_rows = np.concatenate(list(fold_dice.values()))
    per_class = {names[c + 1]: None if np.all(np.isnan(all_rows[:, c])) else
                 float(np.nanmean(all_rows[:, c])) for c in range(all_rows.shape[1])}
    means = np.array(list(fold_means.values()))
    return dict(mean_dice=float(means.mean()), std_dice=float(means.std()), per_class=per_class,
                folds={str(k): v for k, v in fold_means.items()})


def write_results(args, cfg, fold_dice, names, info, cases, started, title, extra=None):
    """OUT/results.json (the table, the arguments, the config, the cases of each fold), the printed
    table, and the run folder marked finished. cases: {fold: (train_ids, test_ids)}."""
    plain = lambda d: {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    results = summarise(fold_dice, names)
    results.update(checkpoint=str(args.checkpoint) if args.checkpoint else None,
                   init=args.init or "checkpoint",
                   backbone_step=info["step"], backbone_preprocessing=info["preprocessing"],
                   data_preprocessing=preprocessing(read_dataset(args.data)[1]),
                   args=plain(vars(args)), config=plain(cfg),
                   seconds=round(time.time() - started, 1),
                   train_cases={str(k): list(v[0]) for k, v in cases.items()},
                   test_cases={str(k): list(v[1]) for k, v in cases.items()}, **(extra or {}))
    write_json(Path(args.out) / "results.json", results)
    runtime.finish_run(args.out)
    print(f"\n{title}, {args.checkpoint or 'random init'}")
    for name, d in results["per_class"].items():
        print(f"  {name:<16} {'n/a' if d is None else f'{d:.3f}'}")
    print(f"  {'mean':<16} {results['mean_dice']:.3f} +- {results['std_dice']:.3f} (over "
          f"{len(results['folds'])} fold(s): "
          f"{', '.join(f'{v:.3f}' for v in results['folds'].values())})")
    return results


def announce(title, args, cfg, device, amp_dtype):
    if world_info()[0] == 0:
        print(f"{title} on {world_info()[1]} x {device} "
              f"({'bf16 autocast' if amp_dtype else 'fp32'}): {args.checkpoint or 'random init'}, "
              f"config {json.dumps(cfg)}")


# ------------------------------------------------------------------------- flags, rules and presets

def add_common_args(p):
    """The flags linear_probe.py and finetune.py share."""
    # Data and protocol
    p.add_argument("--data", required=True, help="preprocessed DATA_DIR, or 'demo' (data/demo)")
    p.add_argument("--test-data", help="evaluate on this labelled set (apart from --data)")
    p.add_argument("--out", required=True, help="folder for results.json (and models)")
    p.add_argument("--force", action="store_true",
                   help="replace the run in --out (its files are removed first)")
    p.add_argument("--folds", type=positive_int, default=3, help="k of k-fold cross-validation")
    p.add_argument("--fold", type=non_negative_int, help="run only this fold [all]")
    p.add_argument("--train-cases", type=positive_int,
                   help="label budget: training cases per fold [all]")
    p.add_argument("--draw", type=non_negative_int, default=0,
                   help="which seeded draw of --train-cases cases")
    p.add_argument("--split", nargs="?", const=True, metavar="FILE",
                   help="a fixed split (train / val / test case ids) instead of cross-validation; "
                        "without FILE, DATA/split.json (preprocess.py --demo writes one)")
    p.add_argument("--evaluate-on", choices=["test", "val"], default="test",
                   help="with --split: the cases scored")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--preset", choices=["paper", "demo"],
                   help="demo: the script's DEMO replaces some defaults [demo for --data demo]")
    # Backbone
    p.add_argument("--checkpoint",
                   help="a pretrain.py run folder or its backbone.pt (or the authors' weights)")
    p.add_argument("--init", choices=["random"],
                   help="random-init baseline instead of --checkpoint")
    p.add_argument("--arch", choices=sorted(ARCHS), default="balanced",
                   help="architecture for --init random")
    p.add_argument("--base-channels", type=positive_int,
                   default=ARCHS["balanced"]["base_channels"], help="for --init random")
    p.add_argument("--num-levels", type=positive_int, default=ARCHS["balanced"]["num_levels"],
                   help="for --init random")
    # Evaluation and device
    p.add_argument("--eval-patch-size", type=positive_int, nargs=3, default=(128, 128, 32),
                   help="sliding-window size at evaluation")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on a GPU, or on a CPU with bf16 instructions, else fp32")


def no_effect(args, flag, idle, why):
    """A refusal: `flag` given where it does nothing (idle) -> its message, else None."""
    if flag in args.given and idle:
        return f"--{flag.replace('_', '-')} has no effect in this run ({why}); leave it out"


def refusals(a):
    """Settings the probe and fine-tuning cannot honour, refused where the flags are parsed."""
    if (a.checkpoint is None) == (a.init != "random"):
        yield ("give exactly one of --checkpoint BACKBONE.pt (or a pretrain.py run folder) or "
               "--init random")
    if a.split and a.test_data:
        yield "--split and --test-data are two ways to choose the test cases: give one"
    yield no_effect(a, "folds", a.split or a.test_data, "--split / --test-data fix one split")
    yield no_effect(a, "evaluate_on", not a.split, "it picks a list of --split")
    yield no_effect(a, "draw", a.train_cases is None, "it picks another draw of --train-cases")


def preset(args, demo):
    """A downstream script's preset: with the demo's, its values `demo` and the demo's random-init
    FPN (model.DEMO_ARCHS); else the paper's FPN."""
    if runtime.is_demo(args):
        return {**DEMO_ARCHS[args.arch], **demo}
    return dict(ARCHS[args.arch])
