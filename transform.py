"""Sec. 3.1 for one case: a scan's arrays to the preprocessed grid and back, and the raw files
it comes from. preprocess.py runs it over a dataset; predict.py over new scans and back onto
their own grid. Nothing here knows of folders of cases or of runs.

  CT:  (1) resample to 1 x 1 x 2 mm, (2) crop to the box of voxels > -500 HU,
       (3) clip to [-1350, 1000] HU and scale to [0, 1].
  MRI: (1) resample to 1.5 mm isotropic, (2) clip to the 0.01 / 99.9 percentiles, scale to
       [0, 1], (3) crop to the box of voxels > 0.3.

Every scan is turned to canonical RAS voxel order first, so a volume is (X, Y, Z) and the
paper's 128 x 128 x 32 patch is (X, Y, Z). Several channels of a case (nnU-Net's CASE_0000 ...,
or one 4-D image) are normalised each by its scheme ("ct": the CT window, "mri": the MRI
percentiles) on one grid and cropped to the union of their bodies. Choices the paper leaves
open: the resampled grid keeps voxel 0's centre (images separable linear, labels nearest), so
its inverse (to_original_grid) is an index lookup per axis; MRI percentiles over the whole
resampled volume; the body mask's holes filled slice by slice. Bad input is an InputError whose
message starts with the file's name.
"""
import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation
from nibabel.orientations import ornt_transform
from scipy import ndimage

from data import InputError
from runtime import atomic

PRESETS = {  # Sec. 3.1
    "ct": {"spacing": [1.0, 1.0, 2.0], "clip": [-1350.0, 1000.0], "body_threshold_hu": -500.0},
    "mri": {"spacing": [1.5, 1.5, 1.5], "clip_percentiles": [0.01, 99.9], "body_threshold": 0.3},
}
MIN_RESAMPLED_VOXELS = 4  # per axis: fewer means the header's spacing is wrong
MAX_RESAMPLED_GIB = 4.0   # a 1 x 1 x 2 mm whole-body CT is ~0.5 GiB; far more means a wrong header


# ---------------------------------------------------------------- one case's arrays (Sec. 3.1)

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
    if len(names) == 1:
        return [dict(name=names[0], scheme=modality)]
    return [dict(name=n, scheme="ct" if n.lower() == "ct" else "mri") for n in names]


def validate_case(image, affine, label=None, label_affine=None, names=("image", "label"),
                  max_label=255):
    """-> (image float32 (X, Y, Z), label uint8 (X, Y, Z) or None); raises InputError."""
    image_name, label_name = names
    image = image[..., 0] if image.ndim == 4 and image.shape[3] == 1 else image  # harmless 4th
    if image.ndim != 3:
        raise InputError(f"{image_name}: {image.ndim}-D image of shape {image.shape}, expected 3-D")
    if min(image.shape) == 0:
        raise InputError(f"{image_name}: an empty axis in shape {image.shape}")
    finite = np.all(np.isfinite(affine))
    sv = np.linalg.svd(affine[:3, :3], compute_uv=False) if finite else np.zeros(3)
    if sv.max() == 0 or sv.min() / sv.max() < 1e-6:     # relative: a header in metres is fine
        raise InputError(f"{image_name}: singular or rank-deficient affine (its 3 x 3 part has "
                         f"determinant {np.linalg.det(affine[:3, :3]) if finite else 'nan'}): no "
                         "voxel size or orientation can be read")
    if np.iscomplexobj(image):
        raise InputError(f"{image_name}: complex-valued voxels ({image.dtype}); a scan holds real "
                         "intensities (take the magnitude first if this is raw MRI data)")
    image = np.asarray(image, dtype=np.float32)
    bad = image.size - np.count_nonzero(np.isfinite(image))
    if bad:
        raise InputError(f"{image_name}: {bad} NaN/inf voxels")
    if image.min() == image.max():
        raise InputError(f"{image_name}: every voxel is {image.min():g}: an empty or blank scan")
    if label is None:
        return image, None
    label = label[..., 0] if label.ndim == 4 and label.shape[3] == 1 else label
    if label.shape != image.shape:
        raise InputError(f"{label_name}: label shape {label.shape} differs from the image shape "
                         f"{image.shape}")
    if label_affine is not None and not np.allclose(label_affine, affine, atol=1e-3):
        raise InputError(f"{label_name}: label affine differs from the image affine (max abs "
                         f"difference {np.abs(label_affine - affine).max():.4g})")
    if not np.issubdtype(label.dtype, np.integer):
        fraction = label[~(label == np.round(label))]  # NaN fails the comparison too
        if fraction.size:
            raise InputError(f"{label_name}: non-integer label values (e.g. {fraction[0]:g})")
    if label.min() < 0:
        raise InputError(f"{label_name}: negative label values (min {label.min():g})")
    if label.max() > max_label:
        why = "the largest class in dataset.json" if max_label < 255 else "stored as uint8"
        raise InputError(f"{label_name}: label values up to {label.max():g}, more than {max_label} "
                         f"({why})")
    return image, label.astype(np.uint8)


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
        raise InputError(f"{name}: no voxel above the body threshold, nothing to crop to")
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
    checked = [validate_case(a, affine, label if c == 0 else None, label_affine, (n, names[1]),
                             max_label)
               for c, (a, n) in enumerate(zip(images, image_names))]
    images, label = [a for a, _ in checked], checked[0][1]
    preset = make_preset(modality, spacing)
    ornt = io_orientation(affine)  # original voxel axes -> closest RAS axes
    canonical_affine = affine @ inv_ornt_aff(ornt, images[0].shape)
    original_shape = list(images[0].shape)
    images = [apply_orientation(a, ornt) for a in images]                        # (X, Y, Z) each
    old_spacing, shape = nib.affines.voxel_sizes(canonical_affine), images[0].shape
    ratio = np.asarray(preset["spacing"]) / old_spacing  # new voxel i <- old coordinate i*ratio
    new_shape = resampled_shape(shape, old_spacing, preset["spacing"])
    gib = 4 * np.prod(new_shape, dtype=np.float64) / 2 ** 30
    if gib > MAX_RESAMPLED_GIB or min(new_shape) < MIN_RESAMPLED_VOXELS:
        size = (f"{gib:.1f} GiB as float32 (limit {MAX_RESAMPLED_GIB} GiB)"
                if gib > MAX_RESAMPLED_GIB else "almost nothing")
        raise InputError(f"{image_names[0]}: spacing {np.round(old_spacing, 4).tolist()} mm x "
                         f"shape {shape} resamples to {new_shape} at {preset['spacing']} mm, "
                         f"{size}; is the voxel size in the header right?")
    scaled, body = [], None
    for channel, scheme, name in zip(images, schemes, image_names):
        resampled = resample_image(channel, ratio, new_shape)                    # step (1)
        if scheme == "ct":    # (2) the body: voxels > -500 HU; (3) the window, scaled to [0, 1]
            mask, (lo, hi) = resampled > PRESETS["ct"]["body_threshold_hu"], PRESETS["ct"]["clip"]
        else:                 # (2) the 0.01 / 99.9 percentiles, scaled to [0, 1]; (3) body: > 0.3
            mask, (lo, hi) = None, np.percentile(resampled, PRESETS["mri"]["clip_percentiles"])
            if hi <= lo:
                raise InputError(f"{name}: constant intensities ({lo:g}), nothing to scale")
        scaled.append((np.clip(resampled, lo, hi) - lo) / (hi - lo))
        mask = scaled[-1] > PRESETS["mri"]["body_threshold"] if mask is None else mask
        body = mask if body is None else body | mask         # the union of the channels' bodies
    box = body_box(body, image_names[0])
    crop = tuple(slice(a, b) for a, b in box)
    image01 = np.stack([s[crop] for s in scaled]) if multi else scaled[0][crop]
    if label is not None:  # nearest: new voxel i <- old voxel round(i * ratio)
        index = [np.minimum(np.floor(np.arange(n) * r + 0.5).astype(np.intp), m - 1)[c]
                 for n, r, m, c in zip(new_shape, ratio, shape, crop)]
        label = np.ascontiguousarray(apply_orientation(label, ornt)[np.ix_(*index)])
    final_affine = canonical_affine @ np.diag([*ratio, 1.0])
    final_affine[:3, 3] += final_affine[:3, :3] @ [b[0] for b in box]  # crop offset
    meta = dict(modality=modality, preset=preset, original_shape=original_shape,
                original_affine=affine.tolist(),
                original_spacing=nib.affines.voxel_sizes(affine).tolist(),
                ornt=ornt.astype(int).tolist(), canonical_shape=list(shape),
                resampled_shape=list(new_shape), crop_box=box, shape=list(image01.shape[-3:]),
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


# ---------------------------------------------------------------- raw files

def load_nifti(path, name=None):
    """-> (array in its stored dtype after NIfTI scaling, affine (4, 4)); name: for messages. Any
    exception of these two calls, which read nothing but the file, is the file's: nibabel raises
    many kinds for a truncated or garbage file."""
    try:
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), img.affine.astype(np.float64)
    except Exception as e:
        why = f"{type(e).__name__}: {e}".replace("\n", " ")[:200]
        raise InputError(f"{name or path}: unreadable or corrupt NIfTI ({why})") from None


def read_channels(paths, channels, show=str):
    """A case's channel files -> (list of (I, J, K) arrays, or one array for a single channel,
    the affine, the channel names for messages). paths: one file per channel, or one 4-D file
    holding them along its last axis (Decathlon v1). Channels on another grid than the first are
    a InputError naming the case and the channel."""
    loaded = [load_nifti(p, show(p)) for p in paths]
    (first, affine), names = loaded[0], [show(p) for p in paths]
    if len(channels) == 1:
        return first, affine, names[0]
    if len(paths) == 1:
        if first.ndim != 4 or first.shape[3] != len(channels):
            raise InputError(f"{names[0]}: shape {first.shape}, expected {len(channels)} channels "
                             f"along its 4th axis ({', '.join(c['name'] for c in channels)})")
        shown = [f"{names[0]} ({c['name']})" for c in channels]
        return [first[..., k] for k in range(len(channels))], affine, shown
    for (image, a), name, c in zip(loaded[1:], names[1:], channels[1:]):
        if image.shape[:3] != first.shape[:3] or not np.allclose(a, affine, atol=1e-3):
            raise InputError(f"{name}: channel {c['name']} is on another grid than {names[0]} "
                             f"(shape {image.shape[:3]} vs {first.shape[:3]}, or another affine)")
    return [image for image, _ in loaded], affine, names


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
    with atomic(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


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
                loop = isinstance(e, RuntimeError) or getattr(e, "errno", 0) == 40
                print(f"skipped {p}: a symbolic link that leads nowhere ({type(e).__name__}: "
                      f"{'a loop' if loop else e.strerror})", file=sys.stderr)
                continue
        if p.is_file():
            found.append((m.group(1), p))
    return found


def read_dataset_description(raw_dir):
    """Class names and channel names of a Decathlon ({"1": "liver"}, "modality") or nnU-Net v2
    ({"liver": 1}, "channel_names") dataset.json -> (labels {"1": "liver"} or None, names or
    None)."""
    path = Path(raw_dir) / "dataset.json"
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as e:
        raise InputError(f"{path}: not a valid dataset.json ({type(e).__name__}: {e})") from None
    if not isinstance(info, dict):
        raise InputError(f"{path}: not a valid dataset.json (a {type(info).__name__}, not an "
                         "object)")
    labels, channels = info.get("labels"), info.get("channel_names") or info.get("modality")
    named = isinstance(channels, dict) and channels
    names = [channels[k] for k in sorted(channels, key=int)] if named else None
    if not labels:
        return None, names
    if not isinstance(labels, dict):
        raise InputError(f"{path}: \"labels\" must map class numbers to names (Decathlon) or names "
                         f"to numbers (nnU-Net v2), got {type(labels).__name__}")
    regions = [k for k, v in labels.items() if isinstance(v, (list, tuple))]
    if regions:
        raise InputError(f"{path}: region-based labels ({', '.join(regions)}) are not supported; "
                         "give one integer per class")
    if all(isinstance(v, int) for v in labels.values()):        # nnU-Net v2: {"liver": 1}
        labels = {v: k for k, v in labels.items()}
    if not all(str(k).isdigit() for k in labels):
        raise InputError(f"{path}: \"labels\" mixes formats: {labels}")
    return {str(int(k)): str(v) for k, v in labels.items()}, names
