"""Segment new scans with fine-tuned models: every fold's model averaged, with test-time mirroring,
the way nnU-Net's `nnUNetv2_predict -i IN -o OUT` does it.

    python predict.py -i SCANS_DIR -o OUT_DIR --model runs/ft                 # every model_fold*.pt
    python predict.py -i SCANS_DIR -o OUT_DIR --model runs/ft --folds 0 2 --save-probabilities
    python predict.py -i scan.nii.gz -o OUT_DIR --model runs/ft/model_fold0.pt --no-tta

Input: a scan, a folder of them, or a Decathlon folder with imagesTs/; a case of C channels is
its files CASE_0000 ... (or one 4-D file), named as the models' channels if a dataset.json beside
them names them. Each case is preprocessed with the models' preset and channel schemes, then every
model and every mirroring gives softmax probabilities by a Gaussian-weighted sliding window
(downstream.sliding_window); their mean is the prediction, its argmax the label map on the scan's
own grid. Test-time mirroring (--tta, on when the models were trained with flips): the mean over
every flip of the axes they were trained to mirror, each flipped back; a model trained without
flips has no axis known to keep its classes (a left-right flip swaps sided ones): refused.

Writes, each file atomically: OUT/CASE.nii.gz (the label map, uint8), with --save-probabilities
OUT/CASE.npz ("probabilities" (K, *scan shape) float16 on the scan's grid, background 1 outside
the body crop; "classes") and OUT/classes.json, and OUT/predictions.json (the settings; per case
its input, output, seconds, voxels per class and status: done, skipped, or failed with a reason).
The folder holds one run (runtime.claim_run) whose settings include the input and the identity of
every model file: the same command continues it, skipping a case only if its scan is unchanged
since its mask was made (predictions.json keeps each scan's identity); others are refused unless
--force, which first removes what the earlier run wrote; a file no run wrote is never replaced.
A bad scan is one FAILED line and the others go on (exit code 1 if one failed, 2 if nothing
could start); a bug in the code stops the run with its traceback.
"""
import argparse
import itertools
import re
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import runtime
from data import InputError, file_identity
from downstream import volume_probabilities
from runtime import atomic, below_one, non_negative_int, read_json, write_json
from transform import list_nifti, preprocess_arrays, read_channels, read_dataset_description
from transform import save_nifti, to_original_grid
from weights import load_segmenter

MUST_AGREE = ("labels", "modality", "preset", "channels")   # one ensemble: one of each


# ----------------------------------------------------------------------------- models

def find_models(model, folds=None):
    """--model: a model file, or a finetune.py run folder (its model_fold<k>.pt, --folds picks)."""
    model = Path(model)
    if model.is_file():
        if folds:
            raise InputError(f"--folds needs a run folder as --model, not the file {model}")
        return [model]
    if not model.is_dir():
        raise InputError(f"--model {model} does not exist")
    matches = [(re.fullmatch(r"model_fold(\d+)\.pt", p.name), p) for p in model.iterdir()]
    found = {int(m.group(1)): p for m, p in matches if m}
    if not found:
        raise InputError(f"--model {model}: no model_fold<k>.pt in it (a finetune.py --out folder)")
    missing = sorted(set(folds or []) - set(found))
    if missing:
        raise InputError(f"--folds {' '.join(map(str, missing))}: {model} has folds "
                         f"{sorted(found)} only")
    return [found[k] for k in sorted(folds or found)]


def load_ensemble(paths):
    """Load every model once -> (models, checkpoints); models that disagree on classes or
    preprocessing are refused, naming the first difference."""
    models, ckpts = zip(*(load_segmenter(p) for p in paths))
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        for key in MUST_AGREE:
            if ckpt.get(key) != ckpts[0].get(key):
                raise InputError(f"{path}: its {key} differs from {paths[0]}'s ({ckpt.get(key)} vs "
                                 f"{ckpts[0].get(key)}); one ensemble needs one of each")
    return list(models), list(ckpts)


def trained_mirror_axes(ckpts):
    """The axes every model of an ensemble was trained to mirror (finetune.py --mirror-axes): (),
    for a model trained without augmentation, if any is."""
    axes = [set(c["mirror_axes"]) if c["aug"] == "nnunet-like" else set() for c in ckpts]
    return tuple(sorted(set.intersection(*axes)))


def flips(axes):
    """Every combination of flips of `axes`, the identity first: (0, 1, 2) -> 8 tuples."""
    return [tuple(a for a, f in zip(axes, bits) if f)
            for bits in itertools.product((0, 1), repeat=len(axes))]


# ----------------------------------------------------------------------------- prediction

@torch.no_grad()
def ensemble_probabilities(models, windows, image, device, mirror_axes=(), overlap=0.5,
                           amp_dtype=None):
    """Mean softmax over models and every mirroring of mirror_axes (test-time mirroring), each
    flipped back. image: (C, X, Y, Z) preprocessed -> (K, X, Y, Z) float32 on the CPU."""
    x = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)       # (C, X, Y, Z)
    total, count = None, 0
    for model, window in zip(models, windows):
        for flip in flips(mirror_axes):
            dims = [1 + a for a in flip]                                          # the spatial axes
            probs = volume_probabilities(model, x.flip(dims) if flip else x, window, device,
                                         amp_dtype, overlap)
            probs = probs.flip(dims) if flip else probs                # (K, X, Y, Z), flipped back
            total = probs if total is None else total + probs
            count += 1
    return (total / count).cpu()


def model_channels(ckpt):
    """The channels a model was trained on: [{"name", "scheme"}]."""
    return ckpt.get("channels") or [dict(name=ckpt["modality"].upper(), scheme=ckpt["modality"])]


def predict_scan(scans, models, ckpts, device, mirror_axes=(), overlap=0.5, amp_dtype=None):
    """Preprocess one case's NIfTI files (one per channel, or one) with the models' preset and
    channel schemes, and predict it -> (probabilities (K, X, Y, Z) on the preprocessed grid, labels
    uint8 on the scan's own grid, preprocessing meta)."""
    channels, preset = model_channels(ckpts[0]), ckpts[0]["preset"]
    if len(scans) not in (1, len(channels)):
        raise InputError(f"{scans[0]}: {len(scans)} channel files, the models take {len(channels)} "
                         f"({', '.join(c['name'] for c in channels)})")
    images, affine, names = read_channels(scans, channels)
    image01, _, _, meta = preprocess_arrays(images, affine, preset["name"], preset["spacing"],
                                            names=(names, "label"),
                                            schemes=[c["scheme"] for c in channels])
    windows = [tuple(c["patch_size"]) for c in ckpts]
    probs = ensemble_probabilities(models, windows, image01.reshape(-1, *meta["shape"]), device,
                                   mirror_axes, overlap, amp_dtype)              # (K, X, Y, Z)
    labels = to_original_grid(probs.argmax(0).numpy().astype(np.uint8), meta)     # scan's grid
    return probs, labels, meta


def segment_case(scans, out_dir, name, models, ckpts, device, mirror_axes, overlap, amp_dtype,
                 save_probabilities):
    """Predict one case and write its files -> voxels per class name on the scan's grid."""
    probs, labels, meta = predict_scan(scans, models, ckpts, device, mirror_axes, overlap,
                                       amp_dtype)
    classes = [ckpts[0]["labels"][str(k)] for k in range(len(ckpts[0]["labels"]))]
    if save_probabilities:     # on the scan's grid; outside the body crop, background is certain
        on_grid = np.stack([to_original_grid(p.numpy(), meta, fill=float(k == 0)).astype(np.float16)
                            for k, p in enumerate(probs)])
        with atomic(out_dir / f"{name}.npz") as tmp:
            np.savez_compressed(tmp, probabilities=on_grid, classes=np.array(classes))
    save_nifti(labels, meta["original_affine"], out_dir / f"{name}.nii.gz")  # last: the case done
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts)}


# ----------------------------------------------------------------------------- scans and folders

def find_scans(path):
    """-i: one scan, a folder of scans, or a Decathlon folder with imagesTs/ -> [(case name, [its
    files: one, or one per channel CASE_0000 ...])]."""
    path = Path(path)
    if path.is_file():
        if not re.search(r"\.nii(\.gz)?$", path.name):
            raise InputError(f"-i {path}: not a .nii or .nii.gz file")
        files = [path]
    elif path.is_dir():
        files = [p for _, p in list_nifti(path)] or [p for _, p in list_nifti(path / "imagesTs")]
        if not files:
            raise InputError(f"-i {path}: no .nii / .nii.gz scans in it (nor in "
                             f"{path / 'imagesTs'})")
    else:
        raise InputError(f"-i {path} does not exist")
    cases = {}
    for f in files:
        name, channel = re.fullmatch(r"(.+?)(?:_(\d{4}))?\.nii(?:\.gz)?", f.name).groups()
        if name in cases and (channel is None or None in cases[name] or channel in cases[name]):
            other = next(iter(cases[name].values())).name
            raise InputError(f"-i: {other} and {f.name} are both case {name!r}")
        cases.setdefault(name, {})[channel] = f
    return [(name, [c[k] for k in sorted(c, key=lambda k: k or "")]) for name, c in cases.items()]


def check_channel_names(inputs, channels):
    """A dataset.json beside the scans (in -i, or its parent) that names several channels must
    name the models' channels, in their order."""
    for folder in (Path(inputs), Path(inputs).parent):
        names = read_dataset_description(folder)[1] if (folder / "dataset.json").is_file() else None
        several = names and (len(names) > 1 or len(channels) > 1)
        if several and names != [c["name"] for c in channels]:
            raise InputError(f"{folder / 'dataset.json'} names the channels {names}, the models "
                             f"were trained on {[c['name'] for c in channels]}")


# ----------------------------------------------------------------------------- main

def main(args):
    """-> exit code: 0 all done or skipped, 1 a case failed (bad input before any case: exit 2)."""
    scans = find_scans(args.input)
    runtime.refuse_inside(args.output, args.input, "-o", "-i")
    paths = find_models(args.model, args.folds)
    device = runtime.pick_device(args.device)
    identities = {str(p): file_identity(p) for p in paths}     # a model replaced: refused
    settings = dict(input=str(Path(args.input).resolve()), tta=args.tta, overlap=args.overlap,
                    models=[str(Path(p).resolve()) for p in paths],
                    save_probabilities=args.save_probabilities)
    probabilities = [f"{name}.npz" for name, _ in scans] + ["classes.json"]
    outputs = ["predictions.json", *(f"{name}.nii.gz" for name, _ in scans),
               *(probabilities if args.save_probabilities else [])]
    out_dir = Path(args.output)
    kept = runtime.claim_run(out_dir, "predict.py", outputs, settings, force=args.force,
                             resume=True, flag="-o", inputs=identities)
    models, ckpts = load_ensemble(paths)
    check_channel_names(args.input, model_channels(ckpts[0]))
    axes = trained_mirror_axes(ckpts) if args.tta is not False else ()
    if args.tta and not axes:
        raise InputError("--tta: the models were trained without mirroring, so no axis is known "
                         "to keep their classes (a left-right flip swaps sided ones); predict "
                         "without --tta")
    earlier = read_json(out_dir / "predictions.json") if "predictions.json" in kept else None
    before = (earlier or {}).get("cases", {})           # each case's scan as it was predicted
    why = {None: "the models' training augmentation", True: "--tta", False: "--no-tta"}[args.tta]
    print(f"predict: {len(scans)} scan(s), {len(models)} model(s) "
          f"({', '.join(p.name for p in paths)}), mirroring "
          f"{'axes ' + ' '.join(map(str, axes)) if axes else 'off'} ({why}), device {device}")
    for m in models:
        m.to(device, memory_format=torch.channels_last_3d)
    classes = {str(k): v for k, v in sorted(ckpts[0]["labels"].items(), key=lambda kv: int(kv[0]))}
    report = dict(settings, tta=bool(axes), mirror_axes=list(axes), classes=classes,
                  model_identities=identities, cases={})
    if args.save_probabilities:
        write_json(out_dir / "classes.json", classes)
    amp_dtype = runtime.amp_dtype(device, args.amp)
    for name, files in tqdm(scans, desc="predict", dynamic_ncols=True):
        record = dict(input=[str(f) for f in files] if len(files) > 1 else str(files[0]),
                      output=str(out_dir / f"{name}.nii.gz"),
                      identity=[file_identity(f) for f in files])
        made = [f"{name}.nii.gz", *([f"{name}.npz"] if args.save_probabilities else [])]
        t0 = time.time()
        if set(made) <= set(kept) and before.get(name, {}).get("identity") == record["identity"]:
            record.update(status="skipped",
                          reason="made from this scan, as it is, by these models already")
        else:
            try:
                counts = segment_case(files, out_dir, name, models, ckpts, device, axes,
                                      args.overlap, amp_dtype, args.save_probabilities)
                record.update(status="done", seconds=round(time.time() - t0, 2),
                              voxels_per_class=counts)
            except InputError as e:   # a bad scan: one line, and the others go on
                record.update(status="failed", reason=str(e))
                tqdm.write(f"FAILED {files[0]}: {e}")
        report["cases"][name] = record
        write_json(out_dir / "predictions.json", report)
    counts = {s: sum(r["status"] == s for r in report["cases"].values())
              for s in ("done", "skipped", "failed")}
    print(f"predict: done {counts['done']} / skipped {counts['skipped']} / failed "
          f"{counts['failed']} -> {out_dir}")
    runtime.finish_run(out_dir)
    return 1 if counts["failed"] else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--input", required=True,
                   help="a scan, a folder of scans, or a Decathlon folder (imagesTs/)")
    p.add_argument("-o", "--output", required=True,
                   help="folder for CASE.nii.gz, predictions.json (and .npz)")
    p.add_argument("--model", required=True,
                   help="a finetune.py run folder (all its folds) or one model_fold<k>.pt")
    p.add_argument("--folds", type=non_negative_int, nargs="+",
                   help="only these folds of the run folder [all]")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time mirroring along the axes the models were trained to mirror "
                        "[on if they were]")
    p.add_argument("--overlap", type=below_one, default=0.5,
                   help="sliding-window overlap between tiles, in [0, 1)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also CASE.npz: float16 probabilities")
    p.add_argument("--force", action="store_true",
                   help="replace the earlier run in -o (its files are removed first)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on a GPU, or on a CPU with bf16 instructions, else fp32")
    return runtime.parse(p, argv, refusals=refusals)


def refusals(a):
    if a.folds and len(set(a.folds)) < len(a.folds):
        yield (f"--folds {' '.join(map(str, a.folds))}: a fold given twice (it would weigh twice "
               "in the ensemble)")


if __name__ == "__main__":
    runtime.cli(main, parse_args,
                interrupted="interrupted; finished cases are kept, the same command continues")
