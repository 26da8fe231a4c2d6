"""Segment new scans with fine-tuned models: every fold's model averaged, with test-time mirroring,
the way nnU-Net's `nnUNetv2_predict -i IN -o OUT` does it.

    python predict.py -i SCANS_DIR -o OUT_DIR --model runs/ft                 # every model_fold*.pt
    python predict.py -i SCANS_DIR -o OUT_DIR --model runs/ft --folds 0 2 --save-probabilities
    python predict.py -i scan.nii.gz -o OUT_DIR --model runs/ft/model_fold0.pt --no-tta

Input: one .nii / .nii.gz scan, a folder of them, or a Decathlon folder whose scans are in
imagesTs/; nnU-Net's channel suffix `_0000` is dropped from the case name. Each scan is
preprocessed with the preset the models were trained with (preprocess.preprocess_arrays), then
for every model and every mirroring a Gaussian-weighted sliding window (volume_probabilities,
overlap --overlap) gives softmax probabilities; their mean is the
prediction, its argmax the label map, written on the scan's own grid (same shape and affine).

Test-time mirroring (--tta): the mean over every combination of flips of the axes the models were
trained to mirror (finetune.py --mirror-axes; 8 for all three), each prediction flipped back. On
by default when the models were trained with flips; a model trained without them (--aug none)
has no axis known to keep its classes (a left-right flip swaps sided classes), so --tta is
refused for it.

Writes, each file atomically:
  OUT/CASE.nii.gz        the label map (uint8) on the scan's grid
  OUT/CASE.npz           --save-probabilities: "probabilities" (classes, *scan shape) float16 on the scan's
                         grid (nearest-neighbour from the preprocessed grid; background 1 outside
                         the body crop) and "classes" (K names); OUT/classes.json names them too
  OUT/predictions.json   the settings, and per case: input, output, seconds, voxels per class,
                         status (done, skipped, failed with a one-line reason)
A re-run with the same settings skips the cases whose outputs exist (an interrupted run goes on);
one with other settings (models, mirroring, overlap) is refused unless --force, which redoes
every case. A scan that fails is one FAILED line and the others go on; the exit code is 1 if any
case failed, 2 if nothing could start.
"""
import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from loss import predict_labels
from model import SegmentationModel
from preprocess import list_nifti, load_nifti, preprocess_arrays, save_nifti, to_original_grid
from runtime import (CHECKPOINT_VERSION, atomic_write, autocast_dtype, claim_output, load_torch, momentum, non_negative_int, pick_device,
                     release_folder, save_json)

WEIGHT_FLOOR = 1e-3   # min Gaussian weight (of max 1), so a voxel seen only at tile borders still counts
MUST_AGREE = ("labels", "modality", "preset")   # models of one ensemble: same classes, same preprocessing


# ----------------------------------------------------------------------------- a volume, window by window

def tile_starts(shape, patch_size, overlap=0.5):
    """Start tuples of patch_size tiles covering every voxel of a (X,Y,Z) `shape`: step
    patch*(1-overlap), last tile aligned to the end; an axis shorter than the patch gets one
    tile at 0 (the caller pads)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    axes = []
    for dim, p in zip(shape, patch_size):
        step = max(1, int(p * (1 - overlap)))
        starts = list(range(0, max(dim - p, 0) + 1, step))
        if starts[-1] < dim - p:
            starts.append(dim - p)
        axes.append(starts)
    return [(x, y, z) for x in axes[0] for y in axes[1] for z in axes[2]]


def gaussian_weights(patch_size, device=None):
    """(X,Y,Z) importance map (nnU-Net): Gaussian with sigma = patch/8 per axis, max 1, floored
    at WEIGHT_FLOOR so no voxel gets zero weight (a border-only voxel would divide by 0)."""
    w = 1.0
    for i, p in enumerate(patch_size):
        x = torch.arange(p, dtype=torch.float32, device=device) - (p - 1) / 2
        g = torch.exp(-0.5 * (x / (p / 8)) ** 2)
        w = w * g.view([-1 if j == i else 1 for j in range(3)])
    return (w / w.max()).clamp_min(WEIGHT_FLOOR)


@torch.no_grad()
def sliding_window_inference(image, predict_fn, patch_size, overlap=0.5, batch_size=4):
    """Predict a whole volume tile by tile (Sec. 3.2 evaluation). image (C,X,Y,Z) tensor;
    predict_fn maps (b,C,*patch_size) -> (b,K,*patch_size). Returns (K,X,Y,Z) float32 on
    image.device: the Gaussian-weighted average of overlapping tile predictions. Autocast and
    model.eval() are the caller's choice."""
    shape, patch = tuple(image.shape[1:]), tuple(int(p) for p in patch_size)
    if image.dim() != 4 or len(patch) != 3:
        raise ValueError(f"sliding_window_inference: image must be (C,X,Y,Z), patch 3 ints; "
                         f"got {tuple(image.shape)}, {patch}")
    padded = tuple(max(d, p) for d, p in zip(shape, patch))  # zero-pad axes shorter than the patch
    pad = [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]]
    image = torch.nn.functional.pad(image, pad)
    weights = gaussian_weights(patch, image.device)  # (X,Y,Z) of the patch
    starts = tile_starts(padded, patch, overlap)
    out, norm = None, torch.zeros(padded, device=image.device)
    for b in range(0, len(starts), batch_size):
        boxes = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in starts[b:b + batch_size]]
        pred = predict_fn(torch.stack([image[(slice(None),) + bx] for bx in boxes])).float()  # (b,K,*patch)
        if pred.shape[0] != len(boxes) or tuple(pred.shape[2:]) != patch:
            raise ValueError(f"predict_fn returned {tuple(pred.shape)} for {len(boxes)} tiles of {patch}")
        if out is None:
            out = torch.zeros((pred.shape[1],) + padded, device=image.device)
        for bx, p in zip(boxes, pred):
            out[(slice(None),) + bx] += p * weights
            norm[bx] += weights
    return (out / norm)[(slice(None),) + tuple(slice(0, d) for d in shape)]


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


# ----------------------------------------------------------------------------- models

def load_model(path):
    """A fine-tuned model written by finetune.py -> (SegmentationModel in eval mode, checkpoint dict)."""
    path = Path(path)
    ckpt = load_torch(path, "model")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "segmenter":
        what = {"backbone": "a pretrained backbone (pretrain.py)"}.get(ckpt.get("kind") if isinstance(ckpt, dict) else None,
                                                                       "not a model from finetune.py")
        raise ValueError(f"{path} is {what}, not a fine-tuned model: pass a finetune.py --out folder or its "
                         "model_fold<k>.pt")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: a model of format version {ckpt.get('version')} (this code reads "
                         f"{CHECKPOINT_VERSION}); re-run finetune.py")
    model = SegmentationModel(**ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def find_models(model, folds=None):
    """--model: a model file, or a finetune.py run folder (its model_fold<k>.pt, --folds picks)."""
    model = Path(model)
    if model.is_file():
        if folds:
            raise ValueError(f"--folds needs a run folder as --model, not the file {model}")
        return [model]
    if not model.is_dir():
        raise ValueError(f"--model {model} does not exist")
    found = {int(m.group(1)): p for p in model.iterdir() if (m := re.fullmatch(r"model_fold(\d+)\.pt", p.name))}
    if not found:
        raise ValueError(f"--model {model}: no model_fold<k>.pt in it (a finetune.py --out folder)")
    twice = sorted({k for k in folds or [] if list(folds).count(k) > 1})
    if twice:
        raise ValueError(f"--folds: fold {' '.join(map(str, twice))} given twice (it would weigh twice in the ensemble)")
    missing = sorted(set(folds or []) - set(found))
    if missing:
        raise ValueError(f"--folds {' '.join(map(str, missing))}: {model} has folds {sorted(found)} only")
    return [found[k] for k in sorted(folds or found)]


def load_ensemble(paths):
    """Load every model once -> (models, checkpoints); models that disagree on classes or
    preprocessing are refused, naming the first difference."""
    models, ckpts = zip(*(load_model(p) for p in paths))
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        for key in MUST_AGREE:
            if ckpt.get(key) != ckpts[0].get(key):
                raise ValueError(f"{path}: its {key} differs from {paths[0]}'s "
                                 f"({ckpt.get(key)} vs {ckpts[0].get(key)}); one ensemble needs one of each")
    return list(models), list(ckpts)


def trained_mirror_axes(ckpts):
    """The axes every model of an ensemble was trained to mirror (finetune.py --mirror-axes): (), for
    a model trained without augmentation, if any is."""
    axes = [set(c["mirror_axes"]) if c["aug"] == "nnunet-like" else set() for c in ckpts]
    return tuple(sorted(set.intersection(*axes)))


def flips(axes):
    """Every combination of flips of `axes`, the identity first: (0, 1, 2) -> 8 tuples."""
    return [tuple(a for a, f in zip(axes, bits) if f) for bits in itertools.product((0, 1), repeat=len(axes))]


# ----------------------------------------------------------------------------- prediction

@torch.no_grad()
def ensemble_probabilities(models, patch_sizes, image, device, mirror_axes=(), overlap=0.5, amp_dtype=None):
    """Mean softmax over models and every mirroring of mirror_axes (test-time mirroring), each
    flipped back.
    image: (X, Y, Z) preprocessed -> (K, X, Y, Z) float32 on the CPU."""
    x = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)       # (X, Y, Z)
    total, count = None, 0
    for model, patch in zip(models, patch_sizes):
        for flip in flips(mirror_axes):
            probs = volume_probabilities(model, x.flip(flip) if flip else x, patch, device, amp_dtype, overlap)
            probs = probs.flip([1 + a for a in flip]) if flip else probs           # (K, X, Y, Z), flipped back
            total = probs if total is None else total + probs
            count += 1
    return (total / count).cpu()


def probabilities_on_scan_grid(probs, meta):
    """(K, X, Y, Z) on the preprocessed grid -> (K, *scan shape) float16 on the scan's grid; outside
    the body crop the background has probability 1."""
    return np.stack([to_original_grid(p.numpy(), meta, fill=1.0 if k == 0 else 0.0).astype(np.float16)
                     for k, p in enumerate(probs)])


def predict_scan(scan, models, ckpts, device, mirror_axes=(), overlap=0.5, amp_dtype=None):
    """Preprocess one NIfTI scan with the models' preset and predict it -> (probabilities (K, X, Y, Z)
    on the preprocessed grid, labels uint8 on the scan's own grid, preprocessing meta)."""
    image, affine = load_nifti(scan)
    spacing = ckpts[0]["preset"].get("spacing")
    image01, _, _, meta = preprocess_arrays(image, affine, ckpts[0]["modality"], spacing=spacing,
                                            names=(str(scan), "label"))
    probs = ensemble_probabilities(models, [tuple(c["patch_size"]) for c in ckpts], image01, device,
                                   mirror_axes, overlap, amp_dtype)                     # (K, X, Y, Z)
    labels = to_original_grid(probs.argmax(0).numpy().astype(np.uint8), meta)     # scan's grid
    return probs, labels, meta


def segment_case(scan, out_dir, name, models, ckpts, device, mirror_axes, overlap, amp_dtype, save_probabilities):
    """Predict one case and write its files -> voxels per class name on the scan's grid."""
    probs, labels, meta = predict_scan(scan, models, ckpts, device, mirror_axes, overlap, amp_dtype)
    classes = [ckpts[0]["labels"][str(k)] for k in range(len(ckpts[0]["labels"]))]
    if save_probabilities:
        on_grid = probabilities_on_scan_grid(probs, meta)
        atomic_write(out_dir / f"{name}.npz",
                     lambda tmp: np.savez_compressed(tmp, probabilities=on_grid, classes=np.array(classes)))
    save_nifti(labels, meta["original_affine"], out_dir / f"{name}.nii.gz")          # last: marks the case done
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts)}


# ----------------------------------------------------------------------------- scans and folders

def case_name(path):
    """scan.nii.gz -> scan; nnU-Net's case_0000.nii.gz -> case."""
    return re.sub(r"_0000$", "", re.sub(r"\.nii(\.gz)?$", "", Path(path).name))


def find_scans(path):
    """-i: one scan, a folder of scans, or a Decathlon folder with imagesTs/ -> [(case name, path)]."""
    path = Path(path)
    if path.is_file():
        if not re.search(r"\.nii(\.gz)?$", path.name):
            raise ValueError(f"-i {path}: not a .nii or .nii.gz file")
        files = [path]
    elif path.is_dir():
        files = [p for _, p in list_nifti(path)] or [p for _, p in list_nifti(path / "imagesTs")]
        if not files:
            raise ValueError(f"-i {path}: no .nii / .nii.gz scans in it (nor in {path / 'imagesTs'})")
    else:
        raise ValueError(f"-i {path} does not exist")
    scans, seen = [], {}
    for f in files:
        name = case_name(f)
        if name in seen:
            raise ValueError(f"-i: {seen[name].name} and {f.name} are both case {name!r}")
        seen[name] = f
        scans.append((name, f))
    return scans


def check_output_folder(inputs, out):
    """Refuse an output folder equal to or inside the input folder (outputs would mix with scans),
    or one that is a file. -> the resolved path (created later, once the models have loaded)."""
    inputs = Path(inputs).resolve()
    folder = inputs if inputs.is_dir() else inputs.parent
    out = Path(out).resolve()
    if out == folder or folder in out.parents:
        raise ValueError(f"-o {out}: inside the input folder {folder}; write predictions elsewhere")
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out}: exists and is not a folder")
    return out


def check_earlier_run(out_dir, report, force):
    """A re-run continues an earlier one only with the same settings: its predictions.json would
    otherwise claim the new settings for masks the old ones made. ValueError unless force."""
    path = Path(out_dir) / "predictions.json"
    if force or not path.is_file():
        return
    try:
        earlier = json.loads(path.read_text())
    except ValueError:
        earlier = {}
    changed = [k for k in ("models", "mirror_axes", "overlap", "save_probabilities") if earlier.get(k) != report[k]]
    if changed:
        raise ValueError(f"-o {out_dir} holds predictions made with other settings ({', '.join(changed)}: "
                         f"{', '.join(str(earlier.get(k)) for k in changed)}); choose another -o, or pass --force to "
                         "redo every case with these")


def is_done(out_dir, name, save_probabilities):
    return (out_dir / f"{name}.nii.gz").is_file() and (not save_probabilities or (out_dir / f"{name}.npz").is_file())


def one_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------- main

def main(args):
    """-> exit code: 0 all done or skipped, 1 some case failed, 2 nothing could start."""
    try:
        scans = find_scans(args.input)
        out_dir = check_output_folder(args.input, args.output)
        paths = find_models(args.model, args.folds)
        device = pick_device(args.device)
        models, ckpts = load_ensemble(paths)
        axes = trained_mirror_axes(ckpts) if args.tta is not False else ()
        if args.tta and not axes:
            raise ValueError("--tta: the models were trained without mirroring, so no axis is known to keep their "
                             "classes (a left-right flip swaps sided ones); predict without --tta")
        report = dict(models=[str(Path(p).resolve()) for p in paths], tta=bool(axes), mirror_axes=list(axes), overlap=args.overlap,
                      save_probabilities=args.save_probabilities, classes={}, cases={})
        check_earlier_run(out_dir, report, args.force)
        claim_output(out_dir, "predict.py", flag="-o")     # one predict.py per output folder
    except ValueError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    why = {None: "the models' training augmentation", True: "--tta", False: "--no-tta"}[args.tta]
    print(f"predict: {len(scans)} scan(s), {len(models)} model(s) ({', '.join(p.name for p in paths)}), mirroring "
          f"{'axes ' + ' '.join(map(str, axes)) if axes else 'off'} ({why}), device {device}")
    for m in models:
        m.to(device, memory_format=torch.channels_last_3d)
    report["classes"] = {str(k): v for k, v in sorted(ckpts[0]["labels"].items(), key=lambda kv: int(kv[0]))}
    if args.save_probabilities:
        save_json(out_dir / "classes.json", report["classes"])
    failed = 0
    for name, scan in tqdm(scans, desc="predict", dynamic_ncols=True):
        record = dict(input=str(scan), output=str(out_dir / f"{name}.nii.gz"))
        t0 = time.time()
        if not args.force and is_done(out_dir, name, args.save_probabilities):
            record.update(status="skipped", reason="outputs exist (--force redoes them)")
        else:
            try:
                counts = segment_case(scan, out_dir, name, models, ckpts, device, axes, args.overlap,
                                      autocast_dtype(device, args.amp), args.save_probabilities)
                record.update(status="done", seconds=round(time.time() - t0, 2), voxels_per_class=counts)
            except Exception as e:   # one bad scan must not stop the others
                failed += 1
                record.update(status="failed", reason=one_line(e))
                tqdm.write(f"FAILED {scan}: {record['reason']}")
        report["cases"][name] = record
        save_json(out_dir / "predictions.json", report)
    counts = {s: sum(r["status"] == s for r in report["cases"].values()) for s in ("done", "skipped", "failed")}
    print(f"predict: done {counts['done']} / skipped {counts['skipped']} / failed {counts['failed']} -> {out_dir}")
    release_folder(out_dir)
    return 1 if failed else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="a scan, a folder of scans, or a Decathlon folder (imagesTs/)")
    p.add_argument("-o", "--output", required=True, help="folder for CASE.nii.gz, predictions.json (and .npz)")
    p.add_argument("--model", required=True, help="a finetune.py run folder (all its folds) or one model_fold<k>.pt")
    p.add_argument("--folds", type=non_negative_int, nargs="+", help="only these folds of the run folder [all]")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time mirroring along the axes the models were trained to mirror [on if they were]")
    p.add_argument("--overlap", type=momentum, default=0.5, help="sliding-window overlap between tiles, in [0, 1)")
    p.add_argument("--save-probabilities", action="store_true", help="also CASE.npz: float16 probabilities")
    p.add_argument("--force", action="store_true", help="redo every case, also those whose outputs exist")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on a GPU, or on a CPU with bf16 instructions; fp32 elsewhere")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except KeyboardInterrupt:
        sys.exit("predict.py: interrupted; finished cases are kept, a re-run skips them")
