"""Preprocessing of NIfTI scans into fast-loading arrays (Sec. 3.1); `--demo` writes the demo set (demo.py).

Sec. 3.1 of Kats, Hirsch & Heinrich (2024):
  CT:  (1) resample to 1 x 1 x 2 mm, (2) crop to the box of voxels > -500 HU,
       (3) clip to [-1350, 1000] HU and scale to [0, 1].
  MRI: (1) resample to 1.5 mm isotropic, (2) clip to the 0.01 / 99.9 percentiles, scale to
       [0, 1], (3) crop to the box of voxels > 0.3.
Every scan is first turned to canonical RAS voxel order, so a stored volume is (X, Y, Z) and the
paper's 128 x 128 x 32 patch is (X, Y, Z) = (128, 128, 32). meta.json keeps what is needed to
map a prediction back onto the original scan (`to_original_grid`).
Output: DATA_DIR/cases/<id>/{image.npy, body.npy, label.npy, meta.json}, DATA_DIR/dataset.json.

Run:
  python preprocess.py --input RAW_DIR --output DATA_DIR --modality ct [--workers 4]
      RAW_DIR: Decathlon / nnU-Net layout (imagesTr/, labelsTr/, imagesTs/, dataset.json) or
      a flat folder of unlabelled .nii / .nii.gz scans. A re-run skips finished cases.
  python preprocess.py --demo data/demo   # 20 labelled + 200 unlabelled synthetic abdomen CTs
Expect one line per bad input (`FAILED imagesTr/x.nii.gz: <reason>`), then
`done N / skipped N / failed N`; exit code 0, 1 (a case failed) or 2 (nothing to do).

Choices the paper leaves open:
- Resampling grid: new voxel i sits at old voxel coordinate i * new_spacing / old_spacing
  (voxel-0 centres coincide), new_shape = floor((old_shape - 1) * old / new) + 1, so the
  inverse is a per-axis index lookup. Images: separable linear, labels: nearest.
- MRI percentiles over the whole resampled volume (background included).
- body.npy: the threshold mask with holes filled slice by slice (gas in lungs / bowel counts).

Longer than a stage file should be, because it is one stage: every way a NIfTI file can be wrong
is checked here, per case (validate_case), the geometry is inverted exactly (to_original_grid),
and a folder is processed by worker processes of which one may die without stopping the batch.
"""
import argparse
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation
from nibabel.orientations import ornt_transform
from scipy import ndimage
from tqdm import tqdm

import demo
import runtime
from data import FORMAT_VERSION
from runtime import atomic_write, non_negative_int, positive_float, positive_int, save_json

PRESETS = {  # Sec. 3.1
    "ct": {"spacing": [1.0, 1.0, 2.0], "clip": [-1350.0, 1000.0], "body_threshold_hu": -500.0},
    "mri": {"spacing": [1.5, 1.5, 1.5], "clip_percentiles": [0.01, 99.9], "body_threshold": 0.3},
}
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
MIN_RESAMPLED_VOXELS = 4  # per axis: fewer means the header's spacing is wrong
MAX_RESAMPLED_GIB = 4.0   # a 1 x 1 x 2 mm whole-body CT is ~0.5 GiB; far more means a wrong header


class PreprocessError(ValueError):
    """Bad input for one case; the message starts with the file's name."""


# ---------------------------------------------------------------- files and checks

def save_npy(path, array):
    atomic_write(path, lambda tmp: np.save(tmp, array))  # tmp ends in .npy: no suffix added


def make_preset(modality, spacing=None):
    """The preset as a JSON-friendly dict, optionally with another spacing (mm)."""
    if modality not in PRESETS:
        raise ValueError(f"modality must be one of {sorted(PRESETS)}, got {modality!r}")
    preset = json.loads(json.dumps({"name": modality, **PRESETS[modality]}))  # a deep copy
    if spacing is not None:
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing}")
        preset["spacing"] = [float(s) for s in spacing]
    return preset


def load_nifti(path, name=None):
    """-> (array in its stored dtype after NIfTI scaling, affine (4, 4)); name: for messages."""
    name = name or str(path)
    try:
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), img.affine.astype(np.float64)
    except Exception as e:  # nibabel raises many types for truncated / garbage files
        raise PreprocessError(f"{name}: unreadable or corrupt NIfTI ({type(e).__name__}: {e})")


def validate_case(image, affine, label=None, label_affine=None, names=("image", "label"),
                  max_label=255):
    """-> (image float32 (X, Y, Z), label uint8 (X, Y, Z) or None); raises PreprocessError."""
    image_name, label_name = names
    image = image[..., 0] if image.ndim == 4 and image.shape[3] == 1 else image  # harmless 4th
    if image.ndim != 3:
        raise PreprocessError(f"{image_name}: {image.ndim}-D image of shape {image.shape}, "
                              "expected 3-D")
    if min(image.shape) == 0:
        raise PreprocessError(f"{image_name}: an empty axis in shape {image.shape}")
    sv = np.linalg.svd(affine[:3, :3], compute_uv=False) if np.all(np.isfinite(affine)) else np.zeros(3)
    if sv.max() == 0 or sv.min() / sv.max() < 1e-6:     # relative: a header in metres is tiny, not singular
        raise PreprocessError(f"{image_name}: singular or rank-deficient affine (its 3 x 3 part has determinant "
                              f"{np.linalg.det(affine[:3, :3]) if np.all(np.isfinite(affine)) else 'nan'}): "
                              "no voxel size or orientation can be read")
    if np.iscomplexobj(image):
        raise PreprocessError(f"{image_name}: complex-valued voxels ({image.dtype}); a scan holds real intensities "
                              "(take the magnitude first if this is raw MRI data)")
    image = np.asarray(image, dtype=np.float32)
    bad = image.size - np.count_nonzero(np.isfinite(image))
    if bad:
        raise PreprocessError(f"{image_name}: {bad} NaN/inf voxels")
    if image.min() == image.max():
        raise PreprocessError(f"{image_name}: every voxel is {image.min():g}: an empty or blank scan")
    if label is None:
        return image, None
    label = label[..., 0] if label.ndim == 4 and label.shape[3] == 1 else label
    if label.shape != image.shape:
        raise PreprocessError(f"{label_name}: label shape {label.shape} differs from the image "
                              f"shape {image.shape}")
    if label_affine is not None and not np.allclose(label_affine, affine, atol=1e-3):
        raise PreprocessError(f"{label_name}: label affine differs from the image affine (max "
                              f"abs difference {np.abs(label_affine - affine).max():.4g})")
    if not np.issubdtype(label.dtype, np.integer):
        fraction = label[~(label == np.round(label))]  # NaN fails the comparison too
        if fraction.size:
            raise PreprocessError(f"{label_name}: non-integer label values (e.g. {fraction[0]:g})")
    if label.min() < 0:
        raise PreprocessError(f"{label_name}: negative label values (min {label.min():g})")
    if label.max() > max_label:
        why = "the largest class in dataset.json" if max_label < 255 else "stored as uint8"
        raise PreprocessError(f"{label_name}: label values up to {label.max():g}, more than "
                              f"{max_label} ({why})")
    return image, label.astype(np.uint8)


# ---------------------------------------------------------------- geometry

def resampled_shape(shape, old_spacing, new_spacing):
    """new_shape = floor((old_shape - 1) * old / new) + 1 (the voxel-0-aligned grid)."""
    ratio = np.asarray(old_spacing, float) / np.asarray(new_spacing, float)
    return tuple(int(n) for n in np.floor((np.asarray(shape) - 1) * ratio + 1e-6) + 1)


def resample_axis_linear(array, axis, ratio, new_size):
    """1-D linear interpolation along `axis`: new voxel i <- old coordinate i * ratio."""
    n = array.shape[axis]
    coords = np.minimum(np.arange(new_size) * ratio, n - 1)
    lo = np.clip(np.floor(coords).astype(np.intp), 0, max(n - 2, 0))
    weight = (coords - lo).astype(np.float32)
    out = np.take(array, lo, axis=axis)
    if n == 1 or not weight.any():  # the new grid points are old voxels: a plain gather
        return out
    w = weight.reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    out *= 1 - w
    upper = np.take(array, lo + 1, axis=axis)
    out += np.multiply(upper, w, out=upper)
    return out


def resample_image(image, ratio, new_shape):
    """Trilinear = separable linear; shrinking axes go first to keep intermediates small."""
    for axis in np.argsort(np.asarray(new_shape) / np.asarray(image.shape)):
        image = resample_axis_linear(image, axis, ratio[axis], new_shape[axis])
    return image


def body_box(mask, name):
    """Bounding box [[x0, x1], [y0, y1], [z0, z1]] (end exclusive) of the mask."""
    if not mask.any():
        raise PreprocessError(f"{name}: no voxel above the body threshold, nothing to crop to")
    hits = [np.flatnonzero(mask.any(axis=tuple({0, 1, 2} - {a}))) for a in range(3)]
    return [[int(h[0]), int(h[-1]) + 1] for h in hits]


def fill_body(mask):
    """Fill holes slice by slice (4-connected background): air inside the body counts."""
    structure = np.zeros((3, 3, 3), bool)
    structure[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(mask, structure)


def preprocess_arrays(image, affine, modality, spacing=None, label=None, *, label_affine=None,
                      names=("image", "label"), max_label=255):
    """Sec. 3.1 on in-memory arrays; image (I, J, K) in the scan's voxel order (HU for CT).

    -> (image01 float32 (X, Y, Z) in [0, 1], body bool (X, Y, Z), label uint8 (X, Y, Z) or None,
        meta dict with the geometry `to_original_grid` needs).
    """
    image, label = validate_case(image, affine, label, label_affine, names, max_label)
    preset = make_preset(modality, spacing)
    ornt = io_orientation(affine)  # original voxel axes -> closest RAS axes
    canonical_affine = affine @ inv_ornt_aff(ornt, image.shape)
    original_shape, image = list(image.shape), apply_orientation(image, ornt)  # (X, Y, Z)
    old_spacing = nib.affines.voxel_sizes(canonical_affine)
    ratio = np.asarray(preset["spacing"]) / old_spacing  # new voxel i <- old coordinate i*ratio
    new_shape = resampled_shape(image.shape, old_spacing, preset["spacing"])
    gib = 4 * np.prod(new_shape, dtype=np.float64) / 2 ** 30
    if gib > MAX_RESAMPLED_GIB:
        raise PreprocessError(f"{names[0]}: spacing {np.round(old_spacing, 3).tolist()} mm x shape {image.shape} "
                              f"would resample to {new_shape} ({gib:.1f} GiB as float32, limit {MAX_RESAMPLED_GIB} GiB); "
                              "is the voxel size in the header right?")
    if min(new_shape) < MIN_RESAMPLED_VOXELS:
        raise PreprocessError(f"{names[0]}: spacing {np.round(old_spacing, 4).tolist()} mm x shape {image.shape} "
                              f"resamples to {new_shape} at {preset['spacing']} mm, almost nothing; is the voxel size "
                              "in the header right?")
    resampled = resample_image(image, ratio, new_shape)  # step (1)
    if modality == "ct":
        body = resampled > preset["body_threshold_hu"]
        box = body_box(body, names[0])  # step (2), on HU
        crop = tuple(slice(a, b) for a, b in box)
        lo, hi = preset["clip"]  # step (3)
        image01 = (np.clip(resampled[crop], lo, hi) - lo) / (hi - lo)
    else:
        lo, hi = np.percentile(resampled, preset["clip_percentiles"])  # step (2)
        if hi <= lo:
            raise PreprocessError(f"{names[0]}: constant intensities ({lo:g}), nothing to scale")
        scaled = (np.clip(resampled, lo, hi) - lo) / (hi - lo)
        body = scaled > preset["body_threshold"]
        box = body_box(body, names[0])  # step (3)
        crop = tuple(slice(a, b) for a, b in box)
        image01 = scaled[crop]
    if label is not None:  # nearest: new voxel i <- old voxel round(i * ratio)
        index = [np.minimum(np.floor(np.arange(n) * r + 0.5).astype(np.intp), m - 1)[c]
                 for n, r, m, c in zip(new_shape, ratio, image.shape, crop)]
        label = np.ascontiguousarray(apply_orientation(label, ornt)[np.ix_(*index)])
    final_affine = canonical_affine @ np.diag([*ratio, 1.0])
    final_affine[:3, 3] += final_affine[:3, :3] @ [b[0] for b in box]  # crop offset
    meta = dict(modality=modality, preset=preset, original_shape=original_shape,
                original_affine=affine.tolist(),
                original_spacing=nib.affines.voxel_sizes(affine).tolist(),
                ornt=ornt.astype(int).tolist(), canonical_shape=list(image.shape),
                resampled_shape=list(new_shape), crop_box=box, shape=list(image01.shape),
                spacing=preset["spacing"], affine=final_affine.tolist())
    return image01.astype(np.float32), fill_body(body[crop]), label, meta


def to_original_grid(array, meta, fill=0):
    """(X, Y, Z) array on the preprocessed grid -> the same on the original scan's grid.

    Nearest neighbour, the exact inverse of crop + resample + reorientation: canonical voxel j
    lies at resampled coordinate j / ratio, so every axis is one index lookup (np.ix_).
    """
    array = np.asarray(array)
    if list(array.shape) != meta["shape"]:
        raise ValueError(f"array of shape {array.shape}, the preprocessed grid is {meta['shape']}")
    ornt = np.asarray(meta["ornt"], float)
    canonical = np.asarray(meta["original_affine"]) @ inv_ornt_aff(ornt, meta["original_shape"])
    ratio = np.asarray(meta["spacing"]) / nib.affines.voxel_sizes(canonical)
    index, inside = [], []
    for a in range(3):
        j = np.arange(meta["canonical_shape"][a])
        m = np.floor(j / ratio[a] + 0.5).astype(np.intp)  # nearest resampled voxel
        f = np.minimum(m, meta["resampled_shape"][a] - 1) - meta["crop_box"][a][0]  # cropped
        inside.append((f >= 0) & (f < array.shape[a]))
        index.append(np.clip(f, 0, array.shape[a] - 1))
    out = array[np.ix_(*index)]  # (X, Y, Z) on the canonical grid
    out[~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])] = fill
    out = apply_orientation(out, ornt_transform(axcodes2ornt("RAS"), ornt))
    assert list(out.shape) == meta["original_shape"]
    return np.ascontiguousarray(out)


def save_nifti(array, affine, path):
    """Write an (I, J, K) array with its affine as NIfTI, atomically: labels as uint8 (int16 when
    they do not fit), anything else as float32."""
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        array = array.astype(np.uint8 if array.min() >= 0 and array.max() <= 255 else np.int16)
    else:
        array = array.astype(np.float32)
    img = nib.Nifti1Image(array, np.asarray(affine))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    atomic_write(path, lambda tmp: nib.save(img, str(tmp)))
    return Path(path)


# ---------------------------------------------------------------- cases and folders

def preprocess_case(image_path, label_path, out_dir, case_id, modality, spacing=None, *,
                    split="train", root=None, max_label=255):
    """Read, check, preprocess and save one case to out_dir/cases/<case_id>/ -> meta.

    root: messages name the files relative to it (the raw data folder)."""
    def show(path):
        return str(Path(path).relative_to(root) if root else path)

    image, affine = load_nifti(image_path, show(image_path))
    label, label_affine = load_nifti(label_path, show(label_path)) if label_path else (None,) * 2
    names = (show(image_path), show(label_path) if label_path else "label")
    image01, body, label, meta = preprocess_arrays(image, affine, modality, spacing, label,
                                                   label_affine=label_affine, names=names,
                                                   max_label=max_label)
    case_dir = Path(out_dir) / "cases" / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    (case_dir / "meta.json").unlink(missing_ok=True)  # incomplete until meta.json is back
    save_npy(case_dir / "image.npy", image01.astype(np.float16))
    save_npy(case_dir / "body.npy", body)
    (case_dir / "label.npy").unlink(missing_ok=True)
    if label is not None:
        save_npy(case_dir / "label.npy", label)
    values = np.flatnonzero(np.bincount(label.ravel())).tolist() if label is not None else None
    meta = dict(format_version=FORMAT_VERSION, case_id=case_id, split=split,
                image_file=str(Path(image_path).resolve()),
                label_file=str(Path(label_path).resolve()) if label_path else None,
                label_values=values, **meta)
    save_json(case_dir / "meta.json", meta)  # last: its presence marks the case complete
    return meta


def list_nifti(folder):
    """[(name without extension, path)] of the .nii / .nii.gz files (hidden, '._' skipped). A link
    that leads nowhere (a loop, a missing target) is reported on stderr, not skipped silently."""
    paths = sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []
    found = []
    for p in paths:
        m = re.fullmatch(r"(.+)\.nii(\.gz)?", p.name)
        if not m or p.name.startswith("."):
            continue
        if p.is_symlink():
            try:
                p.resolve(strict=True)
            except (OSError, RuntimeError) as e:
                print(f"skipped {p}: a symbolic link that leads nowhere ({type(e).__name__}: "
                      f"{'a loop' if isinstance(e, RuntimeError) or getattr(e, 'errno', 0) == 40 else e.strerror})",
                      file=sys.stderr)
                continue
        if p.is_file():
            found.append((m.group(1), p))
    return found


def read_label_names(raw_dir):
    """Class names of a Decathlon ({"1": "liver"}) or nnU-Net v2 ({"liver": 1}) dataset.json."""
    path = Path(raw_dir) / "dataset.json"
    try:
        labels = json.loads(path.read_text()).get("labels") if path.is_file() else None
    except (ValueError, AttributeError) as e:
        raise PreprocessError(f"{path}: not a valid dataset.json ({type(e).__name__}: {e})") from None
    if not labels:
        return None
    if not isinstance(labels, dict):
        raise PreprocessError(f"{path}: \"labels\" must map class numbers to names (Decathlon) or names "
                              f"to numbers (nnU-Net v2), got {type(labels).__name__}")
    regions = [k for k, v in labels.items() if isinstance(v, (list, tuple))]
    if regions:
        raise PreprocessError(f"{path}: region-based labels ({', '.join(regions)}) are not supported; "
                              "give one integer per class")
    if all(isinstance(v, int) for v in labels.values()):        # nnU-Net v2: {"liver": 1}
        labels = {v: k for k, v in labels.items()}
    try:
        return {str(int(k)): str(v) for k, v in labels.items()}
    except ValueError:
        raise PreprocessError(f"{path}: \"labels\" mixes formats: {labels}") from None


def find_cases(raw_dir):
    """-> (jobs: dicts(case_id, image, label, split), failures: messages naming the files)."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise PreprocessError(f"{raw_dir}: input folder does not exist")
    decathlon = (raw_dir / "imagesTr").is_dir()  # else a flat folder of unlabelled scans
    labels = dict(list_nifti(raw_dir / "labelsTr")) if decathlon else {}
    jobs, failures = [], []
    for split, folder in [("train", "imagesTr"), ("test", "imagesTs")] if decathlon else [
            ("unlabelled", ".")]:
        for stem, path in list_nifti(raw_dir / folder):
            match = re.fullmatch(r"(.+)_(\d{4})", stem) if decathlon else None  # nnU-Net _0000
            case_id, channel = match.groups() if match else (stem, "0000")
            name = path.relative_to(raw_dir)
            if channel != "0000":
                failures.append(f"{name}: channel _{channel}; only single-channel input (_0000) "
                                "is supported")
            elif case_id in {j["case_id"] for j in jobs}:
                failures.append(f"{name}: duplicate case id {case_id!r}")
            elif split == "train" and case_id not in labels:
                failures.append(f"{name}: no label labelsTr/{case_id}.nii.gz")
            else:
                jobs.append(dict(case_id=case_id, image=path, split=split,
                                 label=labels[case_id] if split == "train" else None))
    trained = {j["case_id"] for j in jobs if j["split"] == "train"}
    failures += [f"labelsTr/{p.name}: label without an image in imagesTr/"
                 for s, p in labels.items() if s not in trained]
    if not jobs and not failures:
        raise PreprocessError(f"{raw_dir}: no .nii / .nii.gz files found (expected imagesTr/ + "
                              "labelsTr/, or a flat folder of scans)")
    return jobs, failures


def read_meta(case_dir):
    try:
        return json.loads((Path(case_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def is_complete(meta, preset):
    return meta.get("format_version") == FORMAT_VERSION and meta.get("preset") == preset


def run_job(job):
    """Worker: one case -> error message or None. Bad input must not stop the batch."""
    try:
        preprocess_case(job["image"], job["label"], job["out_dir"], job["case_id"],
                        job["modality"], job["spacing"], split=job["split"], root=job["root"],
                        max_label=job["max_label"])
    except PreprocessError as e:
        return str(e)
    except Exception as e:  # a surprise is still reported per case, never silent
        return f"{Path(job['image']).relative_to(job['root'])}: {type(e).__name__}: {e}"


def map_jobs(jobs, workers, fn=run_job):
    """fn over jobs, inline (workers <= 1) or in worker processes, in completion order."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    retry = []
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_die_with_parent) as pool:
        futures = {pool.submit(fn, j): j for j in jobs}
        for f in as_completed(futures):
            try:
                yield f.result()
            except BrokenProcessPool:       # a worker was killed (e.g. out of memory): every job left fails
                retry.append(futures[f])
    for job in retry:                       # each alone in a fresh process: a crash now is its own
        with ProcessPoolExecutor(max_workers=1, initializer=_die_with_parent) as pool:
            try:
                yield pool.submit(fn, job).result()
            except BrokenProcessPool:
                name = Path(job["image"]).relative_to(job["root"]) if "image" in job else job
                yield f"{name}: its worker process died (killed, or out of memory)"


def _die_with_parent():
    """Worker initializer: on Linux, get SIGTERM when the parent dies (no orphaned workers)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
        except OSError:
            pass


def write_dataset_json(out_dir, modality, preset, labels):
    """dataset.json listing every complete case in out_dir made with this preset."""
    metas = [m for m in map(read_meta, sorted(Path(out_dir).glob("cases/*")))
             if is_complete(m, preset)]
    cases = [dict(id=m["case_id"], split=m["split"], labelled=m["label_file"] is not None,
                  shape=m["shape"]) for m in metas]
    values = [v for m in metas for v in m["label_values"] or []]
    if labels is None and values:  # no dataset.json in the input: number the classes
        labels = {str(v): f"class_{v}" if v else "background" for v in range(max(values) + 1)}
    save_json(Path(out_dir) / "dataset.json", dict(format_version=FORMAT_VERSION,
              modality=modality, preset=preset, labels=labels, cases=cases))


def preprocess_folder(raw_dir, out_dir, modality, spacing=None, workers=1, force=False):
    """Preprocess a raw folder -> dict(done, skipped, failed: one message per bad case). The output
    folder is claimed as one run of this preset (runtime.claim_run): a re-run continues it, skipping
    finished cases; a folder made with another preset is refused unless force (its cases are redone)."""
    preset = make_preset(modality, spacing)
    raw, out = Path(raw_dir).resolve(), Path(out_dir).resolve()
    if out == raw or raw in out.parents:
        raise PreprocessError(f"--output {out_dir} is (inside) --input {raw_dir}: its dataset.json would replace "
                              "the raw one; choose a folder outside the input")
    jobs, failed = find_cases(raw_dir)
    labels = read_label_names(raw_dir)
    runtime.claim_run(out_dir, "preprocess.py", ("dataset.json",), dict(preset=preset), force=force, resume=not force,
                      flag="--output")
    todo = [j for j in jobs if not is_complete(read_meta(Path(out_dir) / "cases" / j["case_id"]), preset)]
    for job in todo:
        job.update(out_dir=str(out_dir), modality=modality, spacing=spacing, root=Path(raw_dir),
                   max_label=max(map(int, labels)) if labels else 255)
    for stale in Path(out_dir).glob("cases/*/.tmp-*"):
        stale.unlink(missing_ok=True)       # left by a killed run (atomic_write names them so)
    for message in failed:
        print(f"FAILED {message}", file=sys.stderr)
    done = 0
    for message in tqdm(map_jobs(todo, workers), total=len(todo), desc="preprocess", unit="case"):
        if message is None:
            done += 1
        else:
            tqdm.write(f"FAILED {message}", file=sys.stderr)
            failed.append(message)
    write_dataset_json(out_dir, modality, preset, labels)
    runtime.finish_run(out_dir)
    result = dict(done=done, skipped=len(jobs) - len(todo), failed=failed)
    print(f"done {done} / skipped {result['skipped']} / failed {len(failed)}")
    return result


def build_demo(folder, num_cases=20, unlabelled_cases=200, seed=0, workers=1, scale=demo.DEMO_SCALE):
    """`--demo DATA_DIR`: the demo's phantoms (demo.py) written as raw NIfTI and preprocessed like
    real data: the labelled set into DATA_DIR with its fixed split (split.json), and the unlabelled
    pretraining corpus of other phantoms into DATA_DIR/unlabelled."""
    folder = Path(folder)
    if num_cases < 3:
        raise ValueError(f"--num-cases {num_cases}: the demo's split needs at least 3 labelled cases (a training, "
                         "a validation and a test case)")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--demo {folder}: exists and is not a folder")
    for out, count, unlabelled in ((folder, num_cases, False), (folder / "unlabelled", unlabelled_cases, True)):
        if count:
            jobs = demo.raw_jobs(out / "raw", count, seed, scale, unlabelled)
            for _ in tqdm(map_jobs(jobs, workers, demo.write_case), total=len(jobs), desc="demo phantoms"):
                pass
            result = preprocess_folder(out / "raw", out, "ct", workers=workers)
            if result["failed"]:
                raise PreprocessError(f"demo preprocessing failed: {result['failed']}")
    save_json(folder / "split.json", demo.demo_split([f"demo_{i:03d}" for i in range(num_cases)], seed))
    print(f"demo data in {folder}: {num_cases} labelled phantoms (split.json: training pool / validation / test)"
          + (f", and {unlabelled_cases} unlabelled ones of another seed stream in {folder / 'unlabelled'}, the "
             "pretraining corpus of `pretrain.py --data demo`" if unlabelled_cases else ""))
    return folder


# ---------------------------------------------------------------- main

def main(args):
    """-> exit code: 0 ok, 1 some case failed (a ValueError, exit 2: nothing could be done)."""
    if args.demo:
        build_demo(args.demo, args.num_cases, args.unlabelled_cases, args.seed, args.workers)
        return 0
    result = preprocess_folder(args.input, args.output, args.modality, args.spacing, args.workers, force=args.force)
    return 1 if result["failed"] else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Sec. 3.1 preprocessing of NIfTI scans",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    # real data
    parser.add_argument("--input", help="Decathlon/nnU-Net folder or flat folder of .nii(.gz)")
    parser.add_argument("--output", help="preprocessed data folder (DATA_DIR)")
    parser.add_argument("--modality", choices=sorted(PRESETS), help="preset of Sec. 3.1")
    parser.add_argument("--spacing", type=positive_float, nargs=3, metavar=("X", "Y", "Z"),
                        help="override the preset's spacing (mm)")
    parser.add_argument("--force", action="store_true", help="--output may hold data of another preset (replaced)")
    # synthetic demo
    parser.add_argument("--demo", metavar="DATA_DIR", help="write + preprocess the demo set (data/demo: `--data demo`)")
    parser.add_argument("--num-cases", type=positive_int, default=20, help="demo cases")
    parser.add_argument("--unlabelled-cases", type=non_negative_int, default=200,
                        help="demo: also an unlabelled pretraining corpus of this many other phantoms in DATA_DIR/unlabelled")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="demo seed")
    # speed
    parser.add_argument("--workers", type=runtime.worker_count, default=DEFAULT_WORKERS, help="processes")
    return runtime.parse(parser, argv, rules=[
        lambda a: not a.demo and not (a.input and a.output and a.modality) and (
            "--input, --output and --modality are required (or --demo DATA_DIR)"),
        lambda a: a.demo and (a.input or a.output or a.modality) and (
            "--demo writes the demo set; --input, --output and --modality preprocess your scans: give one of the two"),
    ])


if __name__ == "__main__":
    runtime.cli(main, parse_args, interrupted="interrupted; finished cases are kept, a re-run skips them")
