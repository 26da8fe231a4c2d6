"""The demo data of every stage's `--data demo`: synthetic abdomen-like CT phantoms, written as real
NIfTI files that `preprocess.py --demo data/demo` preprocesses like real data: the labelled set
(data/demo/raw/, Decathlon layout, int16 HU, ~0.8 x 0.8 x 2.5 mm, a non-RAS affine) with a fixed
split (demo_split: training pool / validation / test), and an unlabelled corpus of other phantoms
(data/demo/unlabelled: what `pretrain.py --data demo` reads).

A phantom (demo_phantom) holds anatomy at several scales, so a voxel is told by its surroundings,
with every organ's boundary visible as fat planes show it in real CT; what needs context is
telling look-alike organs apart: liver and spleen share one mean intensity, and the two kidneys
are one pattern mirrored (the labels are sided: a left-right mirror swaps two classes).
docs/demo.md shows both, measured. `scale` shrinks the anatomy (not the voxel size or the
textures): DEMO_SCALE gives ~52 x 45 x 20 voxels at 1 x 1 x 2 mm, for minutes of training on 2
CPU cores; the organs a few voxels thick there are drawn larger relative to the body.
"""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff
from scipy import ndimage

import runtime
from runtime import atomic, write_json


DEMO_LABELS = ["background", "liver", "spleen", "kidney_right", "kidney_left", "gallbladder",
                "aorta", "stomach", "adrenal_right"]
# Mean HU of each tissue (portal-venous-phase-like CT). Liver and spleen share their mean (the
# liver's vessels and coarser texture tell them apart, as does position); both kidneys are the
# same cortex / medulla / sinus pattern and differ only in where they are.
HU = dict(air=-1000, fat=-95, muscle=50, liver=100, spleen=100, kidney_cortex=185,
          kidney_medulla=125, sinus_fat=-40, gallbladder=10, gallbladder_wall=60, aorta=200,
          ivc=150, liver_vessel=160, stomach_wall=70, stomach_content=25, gas=-900, bowel_wall=60,
          bowel_content=20, adrenal=45, cortical_bone=750, marrow=230, csf=15, disc=90)
NOISE_HU = 15  # quantum noise SD of the raw phantom
DEMO_SCALE = 0.3  # see the module docstring
DEMO_RAW_ORNT = np.array([[1, -1], [2, -1], [0, 1]])  # RAS (x, y, z) -> stored (z, -x, -y)
# The seed stream of the unlabelled demo phantoms: rng([seed, 7, i]), never a labelled one's
# rng([seed, i]).
UNLABELLED_STREAM = 7


def ellipsoid(u, v, w, centre, radii, angle=0.0):
    """Normalised radius (< 1 inside) of a rotated (in-plane) ellipsoid; u, v, w: (X, Y, Z)."""
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    a, b = u - centre[0], v - centre[1]
    return np.sqrt(((c * a + s * b) / radii[0]) ** 2 + ((c * b - s * a) / radii[1]) ** 2
                   + ((w - centre[2]) / radii[2]) ** 2)


def smooth_field(rng, shape, size, amplitude):
    """Smooth random field (X, Y, Z): random values on a `size` grid, cubic-interpolated to
    1/8 of `shape`, then linearly to `shape` (a cubic zoom to full size is ~10x slower)."""
    coarse = rng.normal(0, amplitude, size)
    mid = np.maximum(np.asarray(shape) // 8, size)
    mid = ndimage.zoom(coarse, mid / coarse.shape, order=3, mode="nearest")
    return ndimage.zoom(mid, np.asarray(shape) / mid.shape, order=1, mode="nearest")


def noise(rng, shape, sigma_mm, spacing):
    """Unit-variance Gaussian-smoothed noise (X, Y, Z), correlation length sigma_mm."""
    t = ndimage.gaussian_filter(rng.standard_normal(shape, np.float32),
                                sigma_mm / np.asarray(spacing))
    return t / t.std()


def demo_phantom(rng, scale=1.0):
    """One synthetic abdomen CT -> (HU float32 (X, Y, Z), label uint8 (X, Y, Z), spacing (3,)).

    Anatomy at several scales, so a voxel is told by its surroundings: skin, subcutaneous fat,
    an abdominal muscle wall, visceral fat around every organ (so each organ's boundary is
    seen, as fat planes show it in real CT), a vertebra with cortex, marrow, canal and discs,
    psoas muscles, rib cross-sections, aorta and vena cava, bowel loops with wall, content and
    gas, and eight labelled organs with their own internal structure (liver vessels, kidney
    cortex / medulla / sinus, stomach wall and gas, gallbladder wall). Each case varies in
    size, position, smooth deformation, organ placement, contrast enhancement and intensity bias.
    """
    spacing = np.array([0.8, 0.8, 2.5]) * rng.uniform(0.9, 1.1, 3)
    spacing[1] = spacing[0]
    size = np.array([82.0, 70.0, 64.0]) * scale * rng.uniform(0.92, 1.08, 3)  # Rx, Ry, Hz (mm)
    half = size + [12 * scale, 12 * scale, 0]  # field of view: body + air margin
    shape = tuple(int(n) for n in np.round(2 * half / spacing) + 1)
    offset = np.append(rng.uniform(-5, 5, 2) * scale, rng.uniform(-6, 6) * scale)
    grid = [(np.arange(n) * s - h - o).reshape([-1 if a == k else 1 for a in range(3)])
            for k, (n, s, h, o) in enumerate(zip(shape, spacing, half, offset))]
    # a random smooth deformation (mm), then normalised coordinates u (right), v (anterior), w (up)
    u, v, w = [((g + smooth_field(rng, shape, (5, 5, 4), 6 * scale)) / r).astype(np.float32)
               for g, r in zip(grid, size)]
    # textures keep their size in mm (they are tissue properties, not anatomy)
    fine, medium, coarse = (noise(rng, shape, s, spacing) for s in (1.0, 2.0, 4.0))
    loops_a, loops_b = (noise(rng, shape, 7.0 * scale, spacing) for _ in range(2))
    enhance = rng.uniform(0.85, 1.15)  # contrast phase: scales enhancement above 40 HU

    def tissue(name):
        hu = HU[name]
        bone = name in ("cortical_bone", "marrow")
        return 40 + (hu - 40) * enhance if hu > 40 and not bone else hu

    hu = np.full(shape, HU["air"], np.float32)
    label = np.zeros(shape, np.uint8)
    r_body = np.sqrt(u ** 2 + v ** 2)
    body = r_body < 1
    fat_depth = 0.14 * rng.uniform(0.7, 1.3)
    hu[body] = HU["fat"] + 10 * medium[body]                                  # subcutaneous fat
    hu[body & (r_body > 0.985)] = 30                                          # skin
    wall = (r_body < 1 - fat_depth) & (r_body > 1 - fat_depth - 0.06)
    hu[wall] = tissue("muscle") + 8 * fine[wall]                     # the abdominal muscle wall
    inside = r_body < 1 - fat_depth - 0.06
    hu[inside] = HU["fat"] + 10 * medium[inside]                              # visceral fat

    def put(mask, value, cls=None, region=inside):
        mask = mask & region
        hu[mask] = value if np.isscalar(value) else value[mask]
        if cls is not None:
            label[mask] = cls
        return mask

    jitter = lambda c, sd=0.03: np.asarray(c) + rng.normal(0, sd, 3)
    grow = lambda r: np.asarray(r) * rng.uniform(0.9, 1.1, 3)
    # bowel loops (unlabelled): tubes where two smooth fields are both near zero, lower and anterior
    gut = ellipsoid(u, v, w, jitter((0.0, 0.25, -0.45)), (0.75, 0.55, 0.7)) < 1
    tube = np.maximum(np.abs(loops_a), np.abs(loops_b))
    put(gut & (tube < 0.32), HU["bowel_wall"] + 8 * fine)
    put(gut & (tube < 0.22), np.where(coarse > 0.8, HU["gas"], HU["bowel_content"] + 8 * fine))
    # spine: vertebral body (cortex + marrow, discs every ~25 mm), canal, posterior arch; psoas
    spine = ellipsoid(u, v, w, (0, -0.62, 0), (0.16, 0.16, 99))
    disc = np.cos(2 * np.pi * (w * size[2] / (25 * scale) + rng.uniform())) > 0.75
    put(spine < 1, np.where(disc, HU["disc"], np.where(spine > 0.78, HU["cortical_bone"],
                                                        HU["marrow"] + 40 * medium)))
    arch = ellipsoid(u, v, w, (0, -0.88, 0), (0.13, 0.1, 99))
    put(arch < 1, HU["cortical_bone"] * 0.8)
    put(arch < 0.5, HU["csf"] + 5 * fine)
    for side in (-1, 1):
        psoas = ellipsoid(u, v, w, (side * 0.24, -0.6, -0.3),
                          (0.1, 0.1, 0.9 * rng.uniform(0.9, 1.1)))
        put(psoas < 1, tissue("muscle") + 8 * fine)
    # ribs: cross-sections along the posterolateral wall, upper half (cortex + marrow)
    for angle in np.radians(np.arange(-160, -10, 28) + rng.normal(0, 4)):
        r = 0.96 - fat_depth
        rib = ellipsoid(u, v, w, (r * np.cos(angle), r * np.sin(angle), 0.55), (0.045, 0.045, 0.5))
        put(rib < 1, np.where(rib > 0.6, HU["cortical_bone"], HU["marrow"]), region=body)
    # great vessels along z: aorta (labelled) left of midline, vena cava right
    put(ellipsoid(u, v, w, jitter((0.13, -0.38, 0), 0.02), (0.09, 0.07, 99)) < 1,
        tissue("ivc") + 6 * fine)
    aorta = ellipsoid(u, v, w, jitter((-0.09, -0.40, 0), 0.02), grow((0.085, 0.085, 99)))
    put(aorta < 1, tissue("aorta") + 8 * fine, 6)
    # liver: two lobes, portal vessels (labelled liver, as in real ground truth), coarse texture
    liver = np.minimum(ellipsoid(u, v, w, jitter((0.40, 0.08, 0.38)), grow((0.45, 0.55, 0.6)),
                                 rng.normal(0, 6)),
                       ellipsoid(u, v, w, jitter((0.08, 0.35, 0.6)), grow((0.32, 0.24, 0.3))))
    vessels = np.abs(medium) < 0.12
    put((liver < 1) & (spine > 1.3),
        np.where(vessels, tissue("liver_vessel"), tissue("liver") + 9 * coarse), 1)
    # spleen: same mean as the liver, fine homogeneous texture, no vessels
    spleen = ellipsoid(u, v, w, jitter((-0.58, -0.22, 0.45)), grow((0.2, 0.3, 0.38)),
                       30 + rng.normal(0, 8))
    put(spleen < 1, tissue("spleen") + 9 * fine, 2)
    # stomach: wall, fluid content, gas pocket anteriorly
    st_c, st_r = jitter((-0.36, 0.3, 0.3)), grow((0.26, 0.23, 0.3))
    stomach = ellipsoid(u, v, w, st_c, st_r, -20 + rng.normal(0, 8))
    put(stomach < 1, np.where(stomach > 0.8, tissue("stomach_wall") + 6 * fine,
                              np.where(v > st_c[1] + 0.6 * st_r[1], HU["gas"],
                                       HU["stomach_content"] + 6 * fine)), 7)
    # kidneys: identical cortex / medulla / sinus, mirrored; they differ only in position
    for cls, side in ((3, 1), (4, -1)):
        k_c = jitter((side * 0.43, -0.45, -0.22 + (0.05 if side < 0 else 0)))
        kidney = ellipsoid(u, v, w, k_c, grow((0.18, 0.22, 0.42)), side * -25 + rng.normal(0, 8))
        sinus = ellipsoid(u, v, w, k_c - (side * 0.08, 0, 0), (0.07, 0.08, 0.18))
        layers = np.where(kidney > 0.72, tissue("kidney_cortex"), tissue("kidney_medulla"))
        put(kidney < 1, layers + 8 * fine, cls)
        put((kidney < 1) & (sinus < 1), HU["sinus_fat"] + 8 * fine, cls)
    # gallbladder: bile with a thin wall, under the liver
    gb = ellipsoid(u, v, w, jitter((0.32, 0.55, -0.2)), grow((0.14, 0.17, 0.3)),
                   10 + rng.normal(0, 8))
    put(gb < 1, np.where(gb > 0.82, tissue("gallbladder_wall"), HU["gallbladder"] + 5 * fine), 5)
    # right adrenal: a thin plate in the fat above-medial to the right kidney
    ad = ellipsoid(u, v, w, jitter((0.27, -0.33, 0.32), 0.02), grow((0.11, 0.17, 0.3)),
                   40 + rng.normal(0, 8))
    put(ad < 1.7, HU["fat"] + 10 * medium, 0)                               # periadrenal fat
    put(ad < 1, tissue("adrenal") + 6 * fine, 8)

    hu += rng.normal(0, NOISE_HU, shape).astype(np.float32)                   # quantum noise
    hu += rng.normal(0, 8)                                                   # calibration offset
    gain = 1 + 0.02 * (rng.normal() * u + rng.normal() * v + rng.normal() * w)  # smooth bias
    hu = (hu + 1000) * gain - 1000 + smooth_field(rng, shape, (3, 3, 3), 8)
    return np.clip(hu, -1024, 3071), label, spacing


def t2_like(hu, rng):
    """A second, MRI-like contrast of a phantom (the multi-channel data of the tests and the lab): a
    fixed non-monotone map of its HU (fluid brightest, fat bright, soft tissue mid, air and bone
    dark) with noise of its own, in arbitrary units that the MRI scheme normalises."""
    bump = lambda centre, width: np.exp(-((hu - centre) / width) ** 2)
    signal = 0.9 * bump(-95, 60) + 1.0 * bump(15, 20) + 0.4 * bump(100, 50)
    return (300 * signal * (hu > -500) + rng.normal(0, 6, hu.shape)).astype(np.float32)


def multichannel_raw(raw_dir, out_dir, channels=("CT", "T2"), layout="nnunet"):
    """The labelled demo phantoms of raw_dir as a dataset of `channels` ("CT": the phantom, "T2":
    t2_like of it, noise seed [9, i]): nnU-Net v2 (CASE_0000 ... files, channel_names) or Decathlon
    v1 (one 4-D image per case, modality). -> out_dir."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    for folder in ("imagesTr", "labelsTr"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    for i, scan in enumerate(sorted((raw_dir / "imagesTr").glob("*.nii.gz"))):
        img = nib.load(scan)
        hu = np.asanyarray(img.dataobj).astype(np.float32)
        arrays = [hu if c == "CT" else t2_like(hu, np.random.default_rng([9, i])) for c in channels]
        case = scan.name[:-len(".nii.gz")]
        if layout == "nnunet":
            for c, array in enumerate(arrays):
                nib.save(nib.Nifti1Image(array, img.affine),
                         out_dir / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        else:
            nib.save(nib.Nifti1Image(np.stack(arrays, -1), img.affine),
                     out_dir / "imagesTr" / scan.name)
        nib.save(nib.load(raw_dir / "labelsTr" / scan.name), out_dir / "labelsTr" / scan.name)
    labels = json.loads((raw_dir / "dataset.json").read_text())["labels"]
    names = {str(c): n for c, n in enumerate(channels)}
    nnunet = dict(channel_names=names, labels={v: int(k) for k, v in labels.items()})
    write_json(out_dir / "dataset.json", nnunet if layout == "nnunet" else dict(modality=names,
                                                                                labels=labels))
    return out_dir


# ----------------------------------------------------------------------------- the demo set

def write_case(job):
    """Worker: phantom (seed, index) -> imagesTr/ + labelsTr/ NIfTI with a non-RAS affine; an
    unlabelled phantom (job["unlabelled"]) comes from its own seed stream, image only, flat."""
    unlabelled = job["unlabelled"]
    stream = [job["seed"], UNLABELLED_STREAM] if unlabelled else [job["seed"]]
    rng = np.random.default_rng([*stream, job["index"]])
    hu, label, spacing = demo_phantom(rng, job["scale"])
    canonical_affine = np.diag([*spacing, 1.0])
    canonical_affine[:3, 3] = rng.uniform(-150, 150, 3)  # scanner-style translation
    affine = canonical_affine @ inv_ornt_aff(DEMO_RAW_ORNT, hu.shape)
    arrays = (("", np.round(hu).astype(np.int16)),) if unlabelled else \
        (("labelsTr", label), ("imagesTr", np.round(hu).astype(np.int16)))
    for folder, array in arrays:
        img = nib.Nifti1Image(apply_orientation(array, DEMO_RAW_ORNT), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        with atomic(Path(job["raw_dir"]) / folder / job["name"]) as tmp:
            nib.save(img, str(tmp))


def raw_jobs(raw_dir, num_cases, seed=0, scale=DEMO_SCALE, unlabelled=False, force=False):
    """The write_case jobs of the phantoms raw_dir still lacks: the labelled set in the Decathlon
    layout (raw_dir/imagesTr, labelsTr, dataset.json), or an unlabelled corpus as a flat folder of
    scans of another seed stream (no case of it is a labelled, validation or test phantom).
    raw_dir is one run of `preprocess.py --demo` (runtime.claim_run): one made with other
    settings is refused unless force; the caller finishes it."""
    raw_dir = Path(raw_dir)
    params = dict(seed=seed, num_cases=num_cases, scale=scale, unlabelled=unlabelled)
    names = [f"{'unlabelled' if unlabelled else 'demo'}_{i:03d}.nii.gz" for i in range(num_cases)]
    files = {n: [n] if unlabelled else [f"imagesTr/{n}", f"labelsTr/{n}"] for n in names}
    outputs = [f for fs in files.values() for f in fs] + ([] if unlabelled else ["dataset.json"])
    kept = runtime.claim_run(raw_dir, "preprocess.py --demo", outputs, params, force=force,
                             resume=not force, flag="--demo")
    for folder in ("",) if unlabelled else ("imagesTr", "labelsTr"):
        (raw_dir / folder).mkdir(parents=True, exist_ok=True)
    if not unlabelled:
        write_json(raw_dir / "dataset.json", dict(
            name="demo", description="synthetic abdomen CT (preprocess.py)", modality={"0": "CT"},
            labels={str(i): n for i, n in enumerate(DEMO_LABELS)}, numTraining=num_cases, test=[],
            training=[dict(image=f"./imagesTr/{n}", label=f"./labelsTr/{n}") for n in names]))
    return [dict(raw_dir=str(raw_dir), seed=seed, index=i, scale=scale, unlabelled=unlabelled,
                 name=n) for i, n in enumerate(names) if not set(files[n]) <= set(kept)]


def demo_split(case_ids, seed=0):
    """A fixed split of the labelled demo: a quarter of the cases for testing, 15% (at least one)
    for validation (choosing a recipe), the rest the training pool, from a shuffle by seed."""
    order = [case_ids[i] for i in np.random.default_rng([seed, 0x5B1]).permutation(len(case_ids))]
    n_test, n_val = max(1, len(order) // 4), max(1, round(0.15 * len(order)))
    return dict(train=sorted(order[n_test + n_val:]), val=sorted(order[n_test:n_test + n_val]),
                test=sorted(order[:n_test]))
