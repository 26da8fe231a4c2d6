"""Synthetic abdomen-like CT phantoms: the demo set every stage's `--data demo` uses.

`python preprocess.py --demo DATA_DIR` writes them as real NIfTI files in the Medical
Segmentation Decathlon layout (int16 Hounsfield units, anisotropic ~0.8 x 0.8 x 2.5 mm spacing,
a non-RAS affine with permuted and flipped axes) and then preprocesses them exactly like real
data (preprocess.py). Each phantom: a trunk with a fat layer, vertebrae, bowel gas, eight
labelled organs of varied size (down to a gallbladder and an adrenal), random smooth
deformation, position and size, organ-specific texture, noise and a smooth intensity bias;
deterministic per (seed, case index).

Context must matter, as in real anatomy: liver and spleen share one intensity distribution
(textures of different scale), the two kidneys differ only in position. `intensity_only_dice`
measures it: the best per-voxel intensity-only classifier cannot separate them.
"""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff
from scipy import ndimage
from tqdm import tqdm

from preprocess import atomic_write, map_jobs, save_json

DEMO_LABELS = ["background", "liver", "spleen", "kidney_right", "kidney_left", "gallbladder",
               "aorta", "stomach", "adrenal_right"]
# Organs as ellipsoids in body-normalised coordinates (u, v, w) = (x / Rx, y / Ry, z / Hz), RAS:
# +u patient right, +v anterior, +w superior. Columns: class, centre, radii, in-plane angle
# (deg), mean HU, texture field (0 fine, 1 medium, 2 coarse), texture amplitude (HU); later rows
# overwrite earlier ones. Context must matter: liver and spleen share mean and marginal
# distribution (unit-variance textures of different scale), the two kidneys differ only in place.
DEMO_ORGANS = [
    (1, (0.45, 0.05, 0.35), (0.50, 0.62, 0.65), 0, 60, 0, 10),  # liver, right lobe
    (1, (0.00, 0.35, 0.55), (0.40, 0.28, 0.35), 0, 60, 0, 10),  # liver, left lobe
    (2, (-0.60, -0.25, 0.45), (0.20, 0.32, 0.40), 30, 60, 2, 10),
    (7, (-0.30, 0.35, 0.45), (0.30, 0.25, 0.35), -20, 30, 1, 12),
    (3, (0.42, -0.45, -0.25), (0.16, 0.20, 0.40), -25, 160, 1, 12),
    (4, (-0.42, -0.45, -0.20), (0.16, 0.20, 0.40), 25, 160, 1, 12),
    (8, (0.28, -0.35, 0.30), (0.05, 0.15, 0.15), 40, 20, 0, 6),
    (5, (0.30, 0.40, 0.00), (0.09, 0.12, 0.22), 10, 10, 2, 4),
    (6, (-0.08, -0.40, 0.00), (0.09, 0.10, 99.0), 0, 200, 2, 6),  # aorta: a tube along z
]
DEMO_RAW_ORNT = np.array([[1, -1], [2, -1], [0, 1]])  # RAS (x, y, z) -> stored (z, -x, -y)


def ellipsoid(u, v, w, centre, radii, angle):
    """Mask of a rotated (in-plane) ellipsoid; u, v, w: (X, Y, Z) normalised coordinates."""
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    a, b = u - centre[0], v - centre[1]
    return (((c * a + s * b) / radii[0]) ** 2 + ((c * b - s * a) / radii[1]) ** 2
            + ((w - centre[2]) / radii[2]) ** 2) < 1


def smooth_field(rng, shape, size, amplitude):
    """Smooth random field (X, Y, Z): random values on a `size` grid, cubic-interpolated to
    1/8 of `shape`, then linearly to `shape` (a cubic zoom to full size is ~10x slower)."""
    coarse = rng.normal(0, amplitude, size)
    mid = np.maximum(np.asarray(shape) // 8, size)
    mid = ndimage.zoom(coarse, mid / coarse.shape, order=3, mode="nearest")
    return ndimage.zoom(mid, np.asarray(shape) / mid.shape, order=1, mode="nearest")


def demo_phantom(rng, scale=1.0):
    """One synthetic abdomen CT -> (HU float32 (X, Y, Z), label uint8 (X, Y, Z), spacing (3,))."""
    spacing = np.array([0.8, 0.8, 2.5]) * rng.uniform(0.9, 1.1, 3)
    spacing[1] = spacing[0]
    size = np.array([82.0, 70.0, 64.0]) * scale * rng.uniform(0.94, 1.06, 3)  # Rx, Ry, Hz (mm)
    half = size + [15 * scale, 15 * scale, 0]  # field of view: body + air margin
    shape = tuple(int(n) for n in np.round(2 * half / spacing) + 1)
    offset = np.append(rng.uniform(-6, 6, 2) * scale, 0)  # body position in the field of view
    grid = [(np.arange(n) * s - h - o).reshape([-1 if a == k else 1 for a in range(3)])
            for k, (n, s, h, o) in enumerate(zip(shape, spacing, half, offset))]
    # random smooth deformation (mm), then normalised coordinates u, v, w, each (X, Y, Z)
    u, v, w = [((g + smooth_field(rng, shape, (6, 6, 5), 7 * scale)) / r).astype(np.float32)
               for g, r in zip(grid, size)]
    fat = 12 * scale * rng.uniform(0.7, 1.3)
    body = u ** 2 + v ** 2 < 1
    inside = (u * size[0] / (size[0] - fat)) ** 2 + (v * size[1] / (size[1] - fat)) ** 2 < 1
    textures = []  # unit-variance smooth noise of three scales (mm)
    for sigma in (1.5, 3.0, 6.0):
        t = ndimage.gaussian_filter(rng.standard_normal(shape, np.float32), sigma / spacing)
        textures.append(t / t.std())
    hu = np.full(shape, -1000.0, np.float32)  # air
    hu[body] = -100 + 8 * textures[1][body]  # subcutaneous fat
    tissue = np.where(textures[2] > 1.3, -90 + 8 * textures[0], 35 + 15 * textures[1])
    hu[inside] = tissue[inside]  # muscle / viscera with islands of visceral fat
    hu[inside & ellipsoid(u, v, w, (0, -0.72, 0), (0.17, 0.17, 99), 0)] = 450  # vertebrae
    for _ in range(rng.integers(3, 7)):  # bowel gas (unlabelled; tests the body hole filling)
        centre = rng.uniform([-0.5, 0.1, -0.9], [0.5, 0.7, 0.2])
        hu[inside & ellipsoid(u, v, w, centre, rng.uniform(0.04, 0.1, 3), 0)] = -950
    label = np.zeros(shape, np.uint8)
    for cls, centre, radii, angle, mean, tex, amp in DEMO_ORGANS:
        centre = np.asarray(centre) + rng.normal(0, 0.04, 3)
        radii = np.asarray(radii) * rng.uniform(0.88, 1.12, 3)
        mask = inside & ellipsoid(u, v, w, centre, radii, angle + rng.normal(0, 8))
        label[mask] = cls
        hu[mask] = mean + amp * textures[tex][mask]
        if DEMO_LABELS[cls] == "stomach":  # a gas pocket in the anterior part of the stomach
            hu[mask & (v > centre[1] + 0.5 * radii[1])] = -900
    hu += rng.normal(0, 15, shape).astype(np.float32)  # quantum noise
    gain = 1 + 0.015 * (rng.normal() * u + rng.normal() * v + rng.normal() * w)  # smooth bias
    hu = (hu + 1000) * gain - 1000 + smooth_field(rng, shape, (3, 3, 3), 8)
    return np.clip(hu, -1024, 3071), label, spacing


def write_demo_case(job):
    """Worker: phantom (seed, index) -> imagesTr/ + labelsTr/ NIfTI with a non-RAS affine."""
    rng = np.random.default_rng([job["seed"], job["index"]])
    hu, label, spacing = demo_phantom(rng, job["scale"])
    canonical_affine = np.diag([*spacing, 1.0])
    canonical_affine[:3, 3] = rng.uniform(-150, 150, 3)  # scanner-style translation
    affine = canonical_affine @ inv_ornt_aff(DEMO_RAW_ORNT, hu.shape)
    name = f"demo_{job['index']:03d}.nii.gz"
    for folder, array in (("labelsTr", label), ("imagesTr", np.round(hu).astype(np.int16))):
        img = nib.Nifti1Image(apply_orientation(array, DEMO_RAW_ORNT), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        atomic_write(Path(job["raw_dir"]) / folder / name, lambda tmp: nib.save(img, str(tmp)))


def make_demo_raw(raw_dir, num_cases=20, seed=0, *, scale=1.0, workers=1):
    """Synthetic abdomen-like CTs in the Decathlon layout (missing cases only) -> raw_dir."""
    raw_dir, params = Path(raw_dir), dict(seed=seed, num_cases=num_cases, scale=scale)
    if (raw_dir / "dataset.json").is_file():
        old = json.loads((raw_dir / "dataset.json").read_text()).get("demo")
        if old != params:
            raise ValueError(f"{raw_dir}: holds a demo made with {old}, not {params}; "
                             "use another folder or delete this one")
    for folder in ("imagesTr", "labelsTr"):
        (raw_dir / folder).mkdir(parents=True, exist_ok=True)
    names = [f"demo_{i:03d}.nii.gz" for i in range(num_cases)]
    jobs = [dict(raw_dir=str(raw_dir), seed=seed, index=i, scale=scale) for i, n in
            enumerate(names) if not all((raw_dir / f / n).is_file() for f in ("imagesTr",
                                                                               "labelsTr"))]
    for _ in tqdm(map_jobs(jobs, workers, write_demo_case), total=len(jobs), desc="demo"):
        pass
    save_json(raw_dir / "dataset.json", dict(
        name="demo", description="synthetic abdomen CT (preprocess.py)", modality={"0": "CT"},
        labels={str(i): n for i, n in enumerate(DEMO_LABELS)}, demo=params,
        numTraining=num_cases, training=[dict(image=f"./imagesTr/{n}", label=f"./labelsTr/{n}")
                                         for n in names], test=[]))
    return raw_dir



def intensity_only_dice(data_dir, num_bins=1000):
    """Dice per class of the best intensity-only classifier -> {class name: dice}.

    Bayes rule on a fine histogram: every intensity bin predicts its majority class over all
    body voxels of all labelled cases (fitted and scored on the same voxels: an upper bound).
    """
    info = json.loads((Path(data_dir) / "dataset.json").read_text())
    names = info["labels"]
    k = max(int(c) for c in names) + 1
    counts = np.zeros((num_bins, k), np.int64)  # (bins, classes)
    for case in (c for c in info["cases"] if c["labelled"]):
        folder = Path(data_dir) / "cases" / case["id"]
        body = np.load(folder / "body.npy")
        bins = np.minimum((np.load(folder / "image.npy")[body] * num_bins).astype(np.int64),
                          num_bins - 1)
        counts += np.bincount(bins * k + np.load(folder / "label.npy")[body],
                              minlength=num_bins * k).reshape(num_bins, k)
    predicted = counts.argmax(axis=1)  # (bins,)
    dice = {}
    for c in range(1, k):
        overlap, size = counts[predicted == c, c].sum(), counts[predicted == c].sum()
        total = size + counts[:, c].sum()
        dice[names[str(c)]] = float(2 * overlap / total) if total else float("nan")
    return dice
