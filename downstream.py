"""What linear_probe.py and finetune.py share: the downstream protocol of Sec. 3.2, in one place.

- backbone files: read a backbone (ours, or the authors' released formats, see model.py's
  REFERENCE_KEYS), rebuild the segmenter from it, freeze it for real;
- folds and label budgets: k-fold cross-validation, the first N of a fixed shuffle;
- evaluation: sliding-window inference over whole held-out volumes, Dice per class, the
  results table (mean +- std over folds) and results.json;
- devices and torchrun set-up and atomic file writes (pretrain.py uses these too).

Nothing runs on import; the stage scripts hold the training loops (the probe trains on cached
features, fine-tuning end to end) and their own defaults.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import list_cases, load_case, load_dataset_json, sliding_window_inference
from loss import dice_per_class, predict_labels
from convert import read_backbone_file
from model import ARCHS, SegmentationModel
from preprocess import resolve_data_dir

# The demo's network (pretrain.py, linear_probe.py and finetune.py build the same one). Why this
# size: see pretrain.py's DEMO preset. The vox2vec/balanced relation is kept: the baseline has
# one more level and half the channels.
DEMO_ARCHS = {"balanced": dict(base_channels=16, num_levels=4),
              "vox2vec": dict(base_channels=8, num_levels=5)}


# ----------------------------------------------------------------------------- devices, torchrun, files

def pick_device(name="auto"):
    """--device: auto (CUDA if present), cpu, cuda, cuda:1, ...; ValueError for one not here."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def setup_distributed(device_name="auto"):
    """Initialise torch.distributed when launched by torchrun. Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def atomic_torch_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: a killed run leaves no half file."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def make_output_dir(path):
    """Create --out (and parents); ValueError, one line, if it cannot be created or written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"--out {path}: folder is not writable")
    return path


def world_info():
    """(rank, world size): (0, 1) unless launched by torchrun (setup_distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def write_json(path, obj):
    """JSON to a temp file in the same folder, then rename (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- backbone

def load_backbone(path):
    """Read a backbone: ours (pretrain.py's backbone.pt) or the authors' released formats
    (convert.py says which). Returns (backbone_config, state_dict in our names, info)."""
    return read_backbone_file(path)


def load_backbone_weights(model, state_dict, path):
    """Load into model.backbone, naming exactly which keys do not fit (MAE's habit)."""
    try:
        model.backbone.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the backbone it describes: {str(e)[:500]}") from None


def is_demo(args):
    return (args.preset or ("demo" if args.data == "demo" else "paper")) == "demo"


def random_backbone_config(args):
    preset = (DEMO_ARCHS if is_demo(args) else ARCHS)[args.arch]
    return dict(in_channels=1, base_channels=args.base_channels or preset["base_channels"],
                num_levels=args.num_levels or preset["num_levels"])


def build_segmenter(args, num_classes, head):
    """SegmentationModel from --checkpoint (architecture read from the file) or --init random."""
    if args.checkpoint:
        backbone_config, state, info = load_backbone(args.checkpoint)
        model = SegmentationModel(backbone_config, num_classes, head=head)
        load_backbone_weights(model, state, args.checkpoint)
    else:
        model = SegmentationModel(random_backbone_config(args), num_classes, head=head)
        info = dict(step=0, arch=args.arch)
    return model, info


def set_backbone_trainable(model, trainable):
    """Freeze for real: no gradients, and eval mode so BatchNorm statistics stay as pretrained."""
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)
    model.backbone.train(trainable and model.training)


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
    if test_dir is not None:
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
        rng = np.random.default_rng(args.seed + 1)
        plan = [(k, sorted(rng.permutation(tr)[:args.train_cases].tolist()), te) for k, tr, te in plan]
    return plan


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def volume_probabilities(model, image, patch_size, device, amp=True, overlap=0.5, batch_size=2):
    """Sliding-window softmax of one preprocessed volume: image (X, Y, Z) array or tensor ->
    (K, X, Y, Z) float32 on device, the Gaussian-weighted average of the overlapping tiles."""
    model.eval()
    x = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)[None]   # (1, X, Y, Z)
    # No window larger than the volume (the FPN takes any size).
    patch_size = tuple(min(p, s) for p, s in zip(patch_size, x.shape[1:]))

    def probabilities(tiles):                                                      # (b, 1, *patch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            tiles = tiles.contiguous(memory_format=torch.channels_last_3d)
            return torch.softmax(model(tiles).float(), dim=1)                       # (b, K, *patch)

    return sliding_window_inference(x, probabilities, patch_size, overlap=overlap, batch_size=batch_size)


def predict_volume(model, image, patch_size, device, amp=True, overlap=0.5, batch_size=2):
    """Sliding-window segmentation of one preprocessed volume (X, Y, Z) -> labels (X, Y, Z) int64."""
    probs = volume_probabilities(model, image, patch_size, device, amp, overlap, batch_size)
    return predict_labels(probs[None])[0].cpu()                                     # (X, Y, Z)


def evaluate(model, data_dir, test_ids, num_classes, cfg, args, device):
    """Dice per foreground class for each test volume: (len(test_ids), num_classes - 1)."""
    rows = []
    for case_id in tqdm(test_ids, desc="evaluate", leave=False):
        case = load_case(data_dir, case_id)
        pred = predict_volume(model, case["image"], cfg["eval_patch_size"], device, amp=args.amp)
        rows.append(dice_per_class(pred.numpy(), np.asarray(case["label"]), num_classes))
    return np.stack(rows)


def summarise(fold_dice, names):
    """fold_dice: {fold: (cases, K-1) array}. Mean over classes per volume (NaN classes ignored),
    over volumes per fold; mean +- std over folds. Per class: mean over all volumes of all folds."""
    fold_means = {k: float(np.nanmean(np.nanmean(d, axis=1))) for k, d in fold_dice.items()}
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


def resolve(args, paper, demo):
    cfg = dict(paper)
    if is_demo(args):
        cfg.update(demo)
    cfg.update({k: v for k, v in vars(args).items() if k in paper and v is not None})
    cfg["patch_size"], cfg["eval_patch_size"] = tuple(cfg["patch_size"]), tuple(cfg["eval_patch_size"])
    return cfg


def check_init(args):
    if (args.checkpoint is None) == (args.init != "random"):
        raise ValueError("give exactly one of --checkpoint BACKBONE.pt or --init random")


def setup(args, paper, demo, head, script):
    """Shared start of linear_probe.py and finetune.py: config, device, folds, and every input
    problem (data, labels, checkpoint) reported as one clear line before any training."""
    try:
        check_init(args)
        cfg = resolve(args, paper, demo)
        args.folds = cfg["folds"]
        data_dir = resolve_data_dir(args.data)
        test_dir = resolve_data_dir(args.test_data) if args.test_data else None
        names = label_names(data_dir)
        plan = plan_folds(args, data_dir, test_dir)
        build_segmenter(args, len(names), head)   # fail fast on a bad checkpoint
        make_output_dir(args.out)
    except ValueError as e:
        sys.exit(f"{script}: error: {e}")
    try:
        rank, world, device = setup_distributed(args.device)
    except ValueError as e:
        sys.exit(f"{script}: error: {e}")
    if cfg["batch_size"] % world:
        sys.exit(f"{script}: error: --batch-size {cfg['batch_size']} is the global batch: it must split "
                 f"evenly over {world} processes")
    return cfg, device, data_dir, test_dir, names, plan


def cross_validate(args, cfg, device, data_dir, test_dir, names, plan, head, train_fold, title,
                   evaluate_fold=None, extra=None):
    """For each fold: a fresh segmenter, `train_fold(model, fold, train_ids)`, then the Dice of
    its test cases: `evaluate_fold(model, fold, test_ids)` -> (cases, K-1), by default
    sliding-window inference (evaluate). Writes OUT/results.json (plus the `extra` dict, filled
    by the caller during the folds) and prints the table."""
    rank, world = world_info()
    out = Path(args.out)
    if rank == 0:
        print(f"{title} on {world} x {device}: {args.checkpoint or 'random init'}, config {json.dumps(cfg)}")
    fold_dice, t0, cases = {}, time.time(), {}
    for fold, train_ids, test_ids in plan:
        cases[fold] = (list(train_ids), list(test_ids))
        torch.manual_seed(args.seed + fold)
        model, info = build_segmenter(args, len(names), head)
        model.to(device, memory_format=torch.channels_last_3d).train()
        train_fold(model, fold, train_ids)
        if rank == 0:       # under torchrun, rank 0 alone evaluates and writes; the others wait
            fold_dice[fold] = (evaluate_fold(model, fold, test_ids) if evaluate_fold else
                               evaluate(model, test_dir or data_dir, test_ids, len(names), cfg, args, device))
            print(f"fold {fold}: {len(train_ids)} train / {len(test_ids)} test cases, "
                  f"mean Dice {np.nanmean(np.nanmean(fold_dice[fold], axis=1)):.3f}")
        if world > 1:
            dist.barrier()
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return None
    plain = lambda d: {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    results = summarise(fold_dice, names)
    results.update(checkpoint=str(args.checkpoint) if args.checkpoint else None, init=args.init or "checkpoint",
                   backbone_step=info["step"], args=plain(vars(args)), config=plain(cfg),
                   seconds=round(time.time() - t0, 1),
                   train_cases={str(k): v[0] for k, v in cases.items()}, test_cases={str(k): v[1] for k, v in cases.items()})
    results.update(extra or {})
    write_json(out / "results.json", results)
    print_table(f"{title}, {args.checkpoint or 'random init'}", results)
    return results


def add_common_args(p, required=True):
    """The flags linear_probe.py and finetune.py share (finetune's --predict needs none of them)."""
    # Data and protocol
    p.add_argument("--data", required=required, help="preprocessed DATA_DIR, or 'demo'")
    p.add_argument("--test-data", help="evaluate on this labelled set instead of cross-validation")
    p.add_argument("--out", required=required, help="folder for results.json (and models)")
    p.add_argument("--folds", type=int, help="k of k-fold cross-validation [3]")
    p.add_argument("--fold", type=int, help="run only this fold")
    p.add_argument("--train-cases", type=int, help="label budget: training cases per fold [all]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=["paper", "demo"], help="defaults to start from [demo for --data demo, else paper]")
    # Backbone
    p.add_argument("--checkpoint", help="backbone.pt from pretrain.py")
    p.add_argument("--init", choices=["random"], help="random-init baseline instead of --checkpoint")
    p.add_argument("--arch", choices=sorted(ARCHS), default="balanced", help="architecture for --init random")
    p.add_argument("--base-channels", type=int, help="for --init random [from --arch / demo preset]")
    p.add_argument("--num-levels", type=int, help="for --init random [from --arch / demo preset]")
    # Optimisation
    p.add_argument("--steps", type=int, help="fine-tuning steps [45000; demo 450]")
    p.add_argument("--batch-size", type=int, help="[7; demo 2]")
    p.add_argument("--patch-size", type=int, nargs=3, help="training patch (fine-tuning) [128 128 32; demo 32 32 16]")
    p.add_argument("--eval-patch-size", type=int, nargs=3, help="sliding-window size at evaluation [128 128 32; demo 96 96 48: one window covers a demo volume]")
    p.add_argument("--lr", type=float, help="Adam learning rate [3e-4; demo: the script's DEMO preset]")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")


