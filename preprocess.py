"""Preprocessing of NIfTI scans into fast-loading arrays (Sec. 3.1); `--demo` builds the demo set.

  CT:  (1) resample to 1 x 1 x 2 mm, (2) crop to the box of voxels > -500 HU,
       (3) clip to [-1350, 1000] HU and scale to [0, 1].
  MRI: (1) resample to 1.5 mm isotropic, (2) clip to the 0.01 / 99.9 percentiles, scale to
       [0, 1], (3) crop to the box of voxels > 0.3.

    python preprocess.py --input RAW_DIR --output DATA_DIR --modality ct [--workers 4]
    python preprocess.py --demo data/demo        # 20 labelled + 200 unlabelled synthetic abdomen CTs

RAW_DIR: a Decathlon / nnU-Net folder (imagesTr/, labelsTr/, imagesTs/, dataset.json) or a flat
folder of unlabelled scans. Several channels per case as nnU-Net keeps them (CASE_0000 ...
CASE_000k and `channel_names`, or Decathlon v1's one 4-D image and `modality`) are normalised
each by the scheme its name calls for ("CT": the CT window; any other: the MRI percentiles, as
nnU-Net treats non-CT channels) on one grid, cropped to the union of their bodies; a
single-channel dataset follows --modality. Every scan is turned to canonical RAS voxel order
first, so a volume is (X, Y, Z) and the paper's 128 x 128 x 32 patch is (X, Y, Z). Output:
DATA_DIR/cases/<id>/{image.npy ((X, Y, Z) or (C, X, Y, Z)), body.npy, label.npy, meta.json} and
DATA_DIR/dataset.json; meta.json maps a prediction back onto the scan (to_original_grid). A bad
case is one `FAILED <file>: <reason>` line and the others finish; a re-run skips finished cases.

Choices the paper leaves open: the resampled grid keeps voxel 0's centre (images separable
linear, labels nearest), so its inverse is an index lookup per axis; MRI percentiles over the
whole resampled volume; body.npy is the threshold mask with holes filled slice by slice.
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
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
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
MAX_DEMO_CASES = 10_000  # phantoms per demo set
MAX_RESAMPLED_GIB = 4.0   # a 1 x 1 x 2 mm whole-body CT is ~0.5 GiB; far more means a wrong header


class PreprocessError(ValueError):
    """Bad input for one case; the message starts with the file's name."""


# ---------------------------------------------------------------- files and checks

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


def channel_schemes(names, modality):
    """[{"name", "scheme"}] per channel: with several channels each by its name ("CT": the CT
    window, any other: the MRI percentiles); a single channel by --modality."""
    names = list(names or [modality.upper()])
    return [dict(name=n, scheme=("ct" if n.lower() == "ct" else "mri") if len(names) > 1 else modality) for n in names]


def load_nifti(path, name=None):
    """-> (array in its stored dtype after NIfTI scaling, affine (4, 4)); name: for messages."""
    try:
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), img.affine.astype(np.float64)
    except Exception as e:  # nibabel raises many types for truncated / garbage files
        raise PreprocessError(f"{name or path}: unreadable or corrupt NIfTI ({type(e).__name__}: {e})")


def validate_case(image, affine, label=None, label_affine=None, names=("image", "label"), max_label=255):
    """-> (image float32 (X, Y, Z), label uint8 (X, Y, Z) or None); raises PreprocessError."""
    image_name, label_name = names
    image = image[..., 0] if image.ndim == 4 and image.shape[3] == 1 else image  # harmless 4th
    if image.ndim != 3:
        raise PreprocessError(f"{image_name}: {image.ndim}-D image of shape {image.shape}, expected 3-D")
    if min(image.shape) == 0:
        raise PreprocessError(f"{image_name}: an empty axis in shape {image.shape}")
    finite = np.all(np.isfinite(affine))
    sv = np.linalg.svd(affine[:3, :3], compute_uv=False) if finite else np.zeros(3)
    if sv.max() == 0 or sv.min() / sv.max() < 1e-6:     # relative: a header in metres is tiny, not singular
        raise PreprocessError(f"{image_name}: singular or rank-deficient affine (its 3 x 3 part has determinant "
                              f"{np.linalg.det(affine[:3, :3]) if finite else 'nan'}): no voxel size or orientation "
                              "can be read")
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
        raise PreprocessError(f"{label_name}: label shape {label.shape} differs from the image shape {image.shape}")
    if label_affine is not None and not np.allclose(label_affine, affine, atol=1e-3):
        raise PreprocessError(f"{label_name}: label affine differs from the image affine (max abs difference "
                              f"{np.abs(label_affine - affine).max():.4g})")
    if not np.issubdtype(label.dtype, np.integer):
        fraction = label[~(label == np.round(label))]  # NaN fails the comparison too
        if fraction.size:
            raise PreprocessError(f"{label_name}: non-integer label values (e.g. {fraction[0]:g})")
    if label.min() < 0:
        raise PreprocessError(f"{label_name}: negative label values (min {label.min():g})")
    if label.max() > max_label:
        why = "the largest class in dataset.json" if max_label < 255 else "stored as uint8"
        raise PreprocessError(f"{label_name}: label values up to {label.max():g}, more than {max_label} ({why})")
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
                      names=("image", "label"), max_label=255, schemes=None):
    """Sec. 3.1 on in-memory arrays: image (I, J, K) in the scan's voxel order (HU for CT), or a
    list of C such channels on one grid, channel c normalised by schemes[c] ("ct" or "mri"; default:
    modality's; names[0] is then a list of C names).
    -> (image01 float32 in [0, 1], (X, Y, Z) or (C, X, Y, Z); body bool (X, Y, Z); label uint8
        (X, Y, Z) or None; meta dict with the geometry to_original_grid needs)."""
    multi = isinstance(image, (list, tuple))
    images, image_names = (list(image), list(names[0])) if multi else ([image], [names[0]])
    schemes = schemes or [modality] * len(images)
    checked = [validate_case(a, affine, label if c == 0 else None, label_affine, (n, names[1]), max_label)
               for c, (a, n) in enumerate(zip(images, image_names))]
    images, label = [a for a, _ in checked], checked[0][1]
    preset = make_preset(modality, spacing)
    ornt = io_orientation(affine)  # original voxel axes -> closest RAS axes
    canonical_affine = affine @ inv_ornt_aff(ornt, images[0].shape)
    original_shape, images = list(images[0].shape), [apply_orientation(a, ornt) for a in images]  # (X, Y, Z)
    old_spacing, shape = nib.affines.voxel_sizes(canonical_affine), images[0].shape
    ratio = np.asarray(preset["spacing"]) / old_spacing  # new voxel i <- old coordinate i*ratio
    new_shape = resampled_shape(shape, old_spacing, preset["spacing"])
    gib = 4 * np.prod(new_shape, dtype=np.float64) / 2 ** 30
    if gib > MAX_RESAMPLED_GIB or min(new_shape) < MIN_RESAMPLED_VOXELS:
        raise PreprocessError(f"{image_names[0]}: spacing {np.round(old_spacing, 4).tolist()} mm x shape {shape} "
                              f"resamples to {new_shape} at {preset['spacing']} mm, " +
                              (f"{gib:.1f} GiB as float32 (limit {MAX_RESAMPLED_GIB} GiB)" if gib > MAX_RESAMPLED_GIB
                               else "almost nothing") + "; is the voxel size in the header right?")
    scaled, body = [], None
    for channel, scheme, name in zip(images, schemes, image_names):
        resampled = resample_image(channel, ratio, new_shape)                    # step (1)
        if scheme == "ct":    # (2) the body: voxels > -500 HU; (3) the window, scaled to [0, 1]
            mask, (lo, hi) = resampled > PRESETS["ct"]["body_threshold_hu"], PRESETS["ct"]["clip"]
        else:                 # (2) the 0.01 / 99.9 percentiles, scaled to [0, 1]; (3) the body: > 0.3
            mask, (lo, hi) = None, np.percentile(resampled, PRESETS["mri"]["clip_percentiles"])
            if hi <= lo:
                raise PreprocessError(f"{name}: constant intensities ({lo:g}), nothing to scale")
        scaled.append((np.clip(resampled, lo, hi) - lo) / (hi - lo))
        mask = scaled[-1] > PRESETS["mri"]["body_threshold"] if mask is None else mask
        body = mask if body is None else body | mask                             # the union of the channels' bodies
    box = body_box(body, image_names[0])
    crop = tuple(slice(a, b) for a, b in box)
    image01 = np.stack([s[crop] for s in scaled]) if multi else scaled[0][crop]
    if label is not None:  # nearest: new voxel i <- old voxel round(i * ratio)
        index = [np.minimum(np.floor(np.arange(n) * r + 0.5).astype(np.intp), m - 1)[c]
                 for n, r, m, c in zip(new_shape, ratio, shape, crop)]
        label = np.ascontiguousarray(apply_orientation(label, ornt)[np.ix_(*index)])
    final_affine = canonical_affine @ np.diag([*ratio, 1.0])
    final_affine[:3, 3] += final_affine[:3, :3] @ [b[0] for b in box]  # crop offset
    meta = dict(modality=modality, preset=preset, original_shape=original_shape, original_affine=affine.tolist(),
                original_spacing=nib.affines.voxel_sizes(affine).tolist(), ornt=ornt.astype(int).tolist(),
                canonical_shape=list(shape), resampled_shape=list(new_shape), crop_box=box,
                shape=list(image01.shape[-3:]), spacing=preset["spacing"], affine=final_affine.tolist())
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

def read_channels(paths, channels, show=str):
    """A case's channel files -> (list of (I, J, K) arrays, or one array for a single channel,
    the affine, the channel names for messages). paths: one file per channel, or one 4-D file
    holding them along its last axis (Decathlon v1). Channels on another grid than the first are
    a PreprocessError naming the case and the channel."""
    loaded = [load_nifti(p, show(p)) for p in paths]
    (first, affine), names = loaded[0], [show(p) for p in paths]
    if len(channels) == 1:
        return first, affine, names[0]
    if len(paths) == 1:
        if first.ndim != 4 or first.shape[3] != len(channels):
            raise PreprocessError(f"{names[0]}: shape {first.shape}, expected {len(channels)} channels along its 4th "
                                  f"axis ({', '.join(c['name'] for c in channels)})")
        return [first[..., k] for k in range(len(channels))], affine, [f"{names[0]} ({c['name']})" for c in channels]
    for (image, a), name, c in zip(loaded[1:], names[1:], channels[1:]):
        if image.shape[:3] != first.shape[:3] or not np.allclose(a, affine, atol=1e-3):
            raise PreprocessError(f"{name}: channel {c['name']} is on another grid than {names[0]} (shape "
                                  f"{image.shape[:3]} vs {first.shape[:3]}, or another affine)")
    return [image for image, _ in loaded], affine, names


def preprocess_case(image_paths, label_path, out_dir, case_id, modality, spacing=None, *, split="train",
                    root=None, max_label=255, channels=None):
    """Read, check, preprocess and save one case to out_dir/cases/<case_id>/ -> meta. channels:
    channel_schemes' list (default: one of --modality's); root: messages name files relative to it."""
    channels = channels or channel_schemes(None, modality)
    show = lambda path: str(Path(path).relative_to(root) if root else path)  # noqa: E731
    images, affine, names = read_channels(image_paths, channels, show)
    label, label_affine = load_nifti(label_path, show(label_path)) if label_path else (None, None)
    image01, body, label, meta = preprocess_arrays(images, affine, modality, spacing, label, label_affine=label_affine,
                                                   names=(names, show(label_path) if label_path else "label"),
                                                   max_label=max_label, schemes=[c["scheme"] for c in channels])
    case_dir = Path(out_dir) / "cases" / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    for name in ("meta.json", "label.npy"):
        (case_dir / name).unlink(missing_ok=True)  # the case is incomplete until meta.json is back
    for name, array in (("image", image01.astype(np.float16)), ("body", body), ("label", label)):
        if array is not None:
            atomic_write(case_dir / f"{name}.npy", lambda tmp: np.save(tmp, array))
    meta = dict(format_version=FORMAT_VERSION, case_id=case_id, split=split,
                image_file=str(Path(image_paths[0]).resolve()),
                label_file=str(Path(label_path).resolve()) if label_path else None,
                label_values=np.flatnonzero(np.bincount(label.ravel())).tolist() if label is not None else None,
                channels=channels, **meta)
    save_json(case_dir / "meta.json", meta)  # last: its presence marks the case complete
    return meta


def list_nifti(folder):
    """[(name without extension, path)] of the .nii / .nii.gz files (hidden, '._' skipped). A link
    that leads nowhere (a loop, a missing target) is reported on stderr, not skipped silently."""
    found = []
    for p in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
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


def read_dataset_description(raw_dir):
    """Class names and channel names of a Decathlon ({"1": "liver"}, "modality") or nnU-Net v2
    ({"liver": 1}, "channel_names") dataset.json -> (labels {"1": "liver"} or None, names or None)."""
    path = Path(raw_dir) / "dataset.json"
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
        labels, channels = info.get("labels"), info.get("channel_names") or info.get("modality")
    except (ValueError, AttributeError) as e:
        raise PreprocessError(f"{path}: not a valid dataset.json ({type(e).__name__}: {e})") from None
    names = [channels[k] for k in sorted(channels, key=int)] if isinstance(channels, dict) and channels else None
    if not labels:
        return None, names
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
        return {str(int(k)): str(v) for k, v in labels.items()}, names
    except ValueError:
        raise PreprocessError(f"{path}: \"labels\" mixes formats: {labels}") from None


def find_cases(raw_dir, num_channels=1):
    """-> (jobs: dicts(case_id, images, label, split), failures: messages naming the files). In a
    Decathlon / nnU-Net folder a case is CASE.nii.gz or its channels CASE_0000 ... (num_channels)."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise PreprocessError(f"{raw_dir}: input folder does not exist")
    decathlon = (raw_dir / "imagesTr").is_dir()  # else a flat folder of unlabelled scans
    labels = dict(list_nifti(raw_dir / "labelsTr")) if decathlon else {}
    jobs, failures, present = [], [], set()
    for split, folder in [("train", "imagesTr"), ("test", "imagesTs")] if decathlon else [("unlabelled", ".")]:
        cases = {}                                    # case id -> {channel (None: no suffix): path}
        for stem, path in list_nifti(raw_dir / folder):
            match = re.fullmatch(r"(.+)_(\d{4})", stem) if decathlon else None  # nnU-Net's _0000
            case_id, channel = (match[1], int(match[2])) if match else (stem, None)
            name = path.relative_to(raw_dir)
            if case_id in {j["case_id"] for j in jobs} or channel in cases.get(case_id, {}) or \
                    (cases.get(case_id) and (channel is None) != (None in cases[case_id])):
                failures.append(f"{name}: duplicate case id {case_id!r}")
            elif channel is not None and channel >= num_channels:
                failures.append(f"{name}: channel _{channel:04d}, but the dataset has {num_channels} channel(s) "
                                "(dataset.json's channel_names / modality); skipped")
            else:
                cases.setdefault(case_id, {})[channel] = path
        present |= set(cases) if split == "train" else set()
        for case_id, files in cases.items():
            images = [files[k] for k in sorted(files, key=lambda k: k or 0)]
            missing = [k for k in range(num_channels) if None not in files and k not in files]
            if missing:
                failures.append(f"{folder}/{case_id}: channel _{missing[0]:04d} is missing ({num_channels} per case)")
            elif split == "train" and case_id not in labels:
                failures.append(f"{images[0].relative_to(raw_dir)}: no label labelsTr/{case_id}.nii.gz")
            else:
                jobs.append(dict(case_id=case_id, images=images, split=split,
                                 label=labels.get(case_id) if split == "train" else None))
    failures += [f"labelsTr/{p.name}: label without an image in imagesTr/" for s, p in labels.items() if s not in present]
    if not jobs and not failures:
        raise PreprocessError(f"{raw_dir}: no .nii / .nii.gz files found (expected imagesTr/ + labelsTr/, or a flat "
                              "folder of scans)")
    return jobs, failures


def read_meta(case_dir):
    try:
        return json.loads((Path(case_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def is_complete(meta, preset, channels):
    return (meta.get("format_version") == FORMAT_VERSION and meta.get("preset") == preset
            and meta.get("channels", channel_schemes(None, preset["name"])) == channels)


def run_job(job):
    """Worker: one case -> error message or None. Bad input must not stop the batch."""
    try:
        preprocess_case(job["images"], job["label"], job["out_dir"], job["case_id"], job["modality"], job["spacing"],
                        split=job["split"], root=job["root"], max_label=job["max_label"], channels=job["channels"])
    except PreprocessError as e:
        return str(e)
    except Exception as e:  # a surprise is still reported per case, never silent
        return f"{Path(job['images'][0]).relative_to(job['root'])}: {type(e).__name__}: {e}"


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
                name = Path(job["images"][0]).relative_to(job["root"]) if isinstance(job, dict) else job
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


def preprocess_folder(raw_dir, out_dir, modality, spacing=None, workers=1, force=False):
    """Preprocess a raw folder -> dict(done, skipped, failed: one message per bad case). The output
    folder is claimed as one run of this preset (runtime.claim_run): a re-run continues it, skipping
    finished cases; a folder made with another preset is refused unless force (its cases are redone)."""
    preset = make_preset(modality, spacing)
    raw, out = Path(raw_dir).resolve(), Path(out_dir).resolve()
    if out == raw or raw in out.parents:
        raise PreprocessError(f"--output {out_dir} is (inside) --input {raw_dir}: its dataset.json would replace "
                              "the raw one; choose a folder outside the input")
    labels, names = read_dataset_description(raw_dir)
    channels = channel_schemes(names, modality)
    jobs, failed = find_cases(raw_dir, len(channels))
    runtime.claim_run(out_dir, "preprocess.py", ("dataset.json",), dict(preset=preset, channels=channels), force=force,
                      resume=not force, flag="--output")
    todo = [j for j in jobs if not is_complete(read_meta(Path(out_dir) / "cases" / j["case_id"]), preset, channels)]
    for job in todo:
        job.update(out_dir=str(out_dir), modality=modality, spacing=spacing, root=Path(raw_dir), channels=channels,
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
    metas = [m for m in map(read_meta, sorted(Path(out_dir).glob("cases/*"))) if is_complete(m, preset, channels)]
    values = [v for m in metas for v in m["label_values"] or []]
    if labels is None and values:  # no dataset.json in the input: number the classes
        labels = {str(v): f"class_{v}" if v else "background" for v in range(max(values) + 1)}
    save_json(Path(out_dir) / "dataset.json", dict(
        format_version=FORMAT_VERSION, modality=modality, preset=preset, channels=channels, labels=labels,
        cases=[dict(id=m["case_id"], split=m["split"], labelled=m["label_file"] is not None, shape=m["shape"])
               for m in metas]))
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
    parser.add_argument("--modality", choices=sorted(PRESETS),
                        help="preset of Sec. 3.1 (its spacing; its scheme for a single-channel dataset)")
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
        lambda a: max(a.num_cases, a.unlabelled_cases) > MAX_DEMO_CASES and (
            f"--num-cases / --unlabelled-cases: at most {MAX_DEMO_CASES} demo phantoms each"),
        lambda a: a.demo and (a.input or a.output or a.modality) and (
            "--demo writes the demo set; --input, --output and --modality preprocess your scans: give one of the two"),
    ])


if __name__ == "__main__":
    runtime.cli(main, parse_args, interrupted="interrupted; finished cases are kept, a re-run skips them")
