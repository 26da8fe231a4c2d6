"""Segment new scans with fine-tuned models: every fold's model averaged, with test-time mirroring,
the way nnU-Net's `nnUNetv2_predict -i IN -o OUT` does it.

    python predict.py -i SCANS_DIR -o OUT_DIR --model runs/ft-demo            # every model_fold*.pt
    python predict.py -i SCANS_DIR -o OUT_DIR --model runs/ft-demo --folds 0 2 --save-probabilities
    python predict.py -i scan.nii.gz -o OUT_DIR --model runs/ft-demo/model_fold0.pt --no-tta

Input: one .nii / .nii.gz scan, a folder of them, or a Decathlon folder whose scans are in
imagesTs/; nnU-Net's channel suffix `_0000` is dropped from the case name. Each scan is
preprocessed with the preset the models were trained with (preprocess.preprocess_arrays), then
for every model and every mirroring a Gaussian-weighted sliding window (downstream.
volume_probabilities, overlap --overlap) gives softmax probabilities; their mean is the
prediction, its argmax the label map, written on the scan's own grid (same shape and affine).

Test-time mirroring (--tta): the mean over the 8 combinations of flips of the three axes, each
prediction flipped back. Default: on when every model was trained with flips (finetune.py --aug
nnunet-like), off otherwise, since a model that never saw a mirrored patch gains nothing from it.

Writes, each file atomically:
  OUT/CASE.nii.gz        the label map (uint8) on the scan's grid
  OUT/CASE.npz           --save-probabilities: "probabilities" (classes, *scan shape) float16 on the scan's
                         grid (nearest-neighbour from the preprocessed grid; background 1 outside
                         the body crop) and "classes" (K names); OUT/classes.json names them too
  OUT/predictions.json   per case: input, output, seconds, voxels per class, status (done,
                         skipped, failed with a one-line reason)
A case whose outputs exist is skipped (--overwrite redoes it); a scan that fails is one FAILED line
and the others go on; the exit code is 1 if any case failed, 2 if nothing could start.
"""
import argparse
import itertools
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from downstream import volume_probabilities
from model import SegmentationModel
from preprocess import list_nifti, load_nifti, preprocess_arrays, save_nifti, to_original_grid
from runtime import (atomic_write, autocast_dtype, claim_folder, load_torch, make_output_dir, momentum, non_negative_int, pick_device,
                     release_folder, save_json)

FLIPS = [tuple(a for a, f in zip((0, 1, 2), bits) if f) for bits in itertools.product((0, 1), repeat=3)]
MUST_AGREE = ("labels", "modality", "preset")   # models of one ensemble: same classes, same preprocessing


# ----------------------------------------------------------------------------- models

def load_model(path):
    """A fine-tuned model written by finetune.py -> (SegmentationModel in eval mode, checkpoint dict)."""
    path = Path(path)
    ckpt = load_torch(path, "model")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "segmenter":
        raise ValueError(f"{path} is not a fine-tuned model from finetune.py (pass DIR/model_fold<k>.pt)")
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


def default_tta(ckpts):
    """Mirroring helps a model trained with flips; older checkpoints carry no `aug` (trained without)."""
    return all(c.get("aug") == "nnunet-like" for c in ckpts)


# ----------------------------------------------------------------------------- prediction

@torch.no_grad()
def ensemble_probabilities(models, patch_sizes, image, device, tta=False, overlap=0.5, amp_dtype=None):
    """Mean softmax over models and (with tta) the 8 mirrorings, each flipped back.
    image: (X, Y, Z) preprocessed -> (K, X, Y, Z) float32 on the CPU."""
    x = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)       # (X, Y, Z)
    total, count = None, 0
    for model, patch in zip(models, patch_sizes):
        for flip in FLIPS if tta else [()]:
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


def predict_scan(scan, models, ckpts, device, tta=False, overlap=0.5, amp_dtype=None):
    """Preprocess one NIfTI scan with the models' preset and predict it -> (probabilities (K, X, Y, Z)
    on the preprocessed grid, labels uint8 on the scan's own grid, preprocessing meta)."""
    image, affine = load_nifti(scan)
    spacing = ckpts[0]["preset"].get("spacing")
    image01, _, _, meta = preprocess_arrays(image, affine, ckpts[0]["modality"], spacing=spacing,
                                            names=(str(scan), "label"))
    probs = ensemble_probabilities(models, [tuple(c["patch_size"]) for c in ckpts], image01, device,
                                   tta, overlap, amp_dtype)                             # (K, X, Y, Z)
    labels = to_original_grid(probs.argmax(0).numpy().astype(np.uint8), meta)     # scan's grid
    return probs, labels, meta


def segment_case(scan, out_dir, name, models, ckpts, device, tta, overlap, amp_dtype, save_probabilities):
    """Predict one case and write its files -> voxels per class name on the scan's grid."""
    probs, labels, meta = predict_scan(scan, models, ckpts, device, tta, overlap, amp_dtype)
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
        paths = find_models(args.model, args.folds)
        device = pick_device(args.device)
        out_dir = check_output_folder(args.input, args.output)
        models, ckpts = load_ensemble(paths)
        make_output_dir(out_dir, "-o")
        claim_folder(out_dir, "predict.py")     # one predict.py per output folder
    except ValueError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    tta = default_tta(ckpts) if args.tta is None else args.tta
    why = ("--tta" if args.tta else "--no-tta") if args.tta is not None else \
        ("default: the models were trained with flips" if tta else "default: the models were trained without flips")
    print(f"predict: {len(scans)} scan(s), {len(models)} model(s) ({', '.join(p.name for p in paths)}), "
          f"mirroring {'on' if tta else 'off'} ({why}), device {device}")
    for m in models:
        m.to(device, memory_format=torch.channels_last_3d)
    classes = {str(k): v for k, v in sorted(ckpts[0]["labels"].items(), key=lambda kv: int(kv[0]))}
    if args.save_probabilities:
        save_json(out_dir / "classes.json", classes)
    report = dict(models=[str(p) for p in paths], tta=tta, overlap=args.overlap, classes=classes, cases={})
    failed = 0
    for name, scan in tqdm(scans, desc="predict", dynamic_ncols=True):
        record = dict(input=str(scan), output=str(out_dir / f"{name}.nii.gz"))
        t0 = time.time()
        if not args.overwrite and is_done(out_dir, name, args.save_probabilities):
            record.update(status="skipped", reason="outputs exist (--overwrite redoes them)")
        else:
            try:
                counts = segment_case(scan, out_dir, name, models, ckpts, device, tta, args.overlap, autocast_dtype(device, args.amp),
                                      args.save_probabilities)
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
                   help="mirroring over the 8 flips of the axes [on if the models were trained with flips]")
    p.add_argument("--overlap", type=momentum, default=0.5, help="sliding-window overlap between tiles, in [0, 1)")
    p.add_argument("--save-probabilities", action="store_true", help="also CASE.npz: float16 probabilities")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on a GPU, or on a CPU with bf16 instructions; fp32 elsewhere")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except KeyboardInterrupt:
        sys.exit("predict.py: interrupted; finished cases are kept, a re-run skips them")
