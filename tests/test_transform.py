"""Tests for transform.py (Sec. 3.1 on one case) against naive references: per-voxel affine
arithmetic, scipy.ndimage.map_coordinates, np.percentile, on tiny synthetic scans and the demo.

Run: python -m pytest -q tests/test_transform.py
"""

import itertools
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import preprocess  # noqa: E402
import transform  # noqa: E402
from data import InputError  # noqa: E402

# twice the demo scale: round-trip Dice is measured on organs of realistic voxel size; 3 cases
DEMO_SCALE = 0.6
# a permuted, flipped, anisotropic, translated affine (like DICOM-derived LPS data)
AFFINE = np.array([[0.0, -1.5, 0, 30], [0, 0, -1.5, 20], [3.0, 0, 0, -40], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("demo")
    return preprocess.build_demo(
        data_dir, num_cases=3, unlabelled_cases=0, seed=1, scale=DEMO_SCALE
    )


def dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def test_round_trip_demo_labels(demo, tmp_path, load_case):
    """Preprocessed demo labels mapped back match the raw labels on the original grid."""
    for case_id in ("demo_000", "demo_001"):
        meta, arrays = load_case(demo, case_id)
        raw = nib.load(str(demo / "raw" / "labelsTr" / f"{case_id}.nii.gz"))
        original = np.asarray(raw.dataobj)
        assert not np.allclose(raw.affine[:3, :3], np.diag(np.diag(raw.affine[:3, :3])))
        back = transform.to_original_grid(arrays["label"], meta)
        assert back.shape == original.shape
        scores = [dice(back == c, original == c) for c in range(1, 9)]
        print(case_id, "round-trip Dice per class", np.round(scores, 3), np.mean(scores))
        assert np.mean(scores) >= 0.95
        assert arrays["body"][arrays["label"] > 0].all()  # gas inside organs counts as body
    path = transform.save_nifti(
        transform.to_original_grid(arrays["label"], meta),
        meta["original_affine"],
        tmp_path / "pred.nii.gz",
    )
    written = nib.load(str(path))
    assert written.shape == original.shape and np.allclose(written.affine, raw.affine)
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(written.dataobj), back)
    assert [p.name for p in tmp_path.iterdir()] == ["pred.nii.gz"]


def naive_original_values(array, meta, voxel, fill):
    """The nearest preprocessed voxel's value for one original voxel, via world coordinates
    (affines). -> set of admissible values (two on an exact tie between neighbours)."""
    world = np.asarray(meta["original_affine"]) @ [*voxel, 1]
    c = np.linalg.solve(np.asarray(meta["affine"]), world)[:3]  # preprocessed voxel coords
    start = np.array([b[0] for b in meta["crop_box"]])
    options = [
        {np.floor(x + 0.5)} | ({np.floor(x), np.ceil(x)} if abs(x % 1 - 0.5) < 1e-6 else set())
        for x in c + start
    ]  # resampled grid
    values = set()
    for m in itertools.product(*options):
        m = np.clip(m, 0, np.array(meta["resampled_shape"]) - 1) - start
        inside = np.all(m >= 0) and np.all(m < array.shape)
        values.add(array[tuple(m.astype(int))] if inside else fill)
    return values


def check_inverse_exact(meta, rng, num=300):
    shape = meta["shape"]
    encoded = np.arange(1, np.prod(shape) + 1, dtype=np.int64).reshape(shape)  # voxel index
    back = transform.to_original_grid(encoded, meta, fill=0)
    assert list(back.shape) == meta["original_shape"]
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in back.shape], indexing="ij"))
    for v in np.concatenate([corners.reshape(3, -1).T, rng.integers(0, back.shape, (num, 3))]):
        assert back[tuple(v)] in naive_original_values(encoded, meta, v, 0), v
    assert len(np.unique(back)) > 1


def test_inverse_mapping_exact_demo(demo, load_case):
    meta, _ = load_case(demo, "demo_002")
    check_inverse_exact(meta, np.random.default_rng(0))


@pytest.mark.parametrize(
    "affine",
    [
        AFFINE,
        np.diag([0.7, 0.7, 5.0, 1.0]),
        np.array([[-0.9, 0, 0, 5], [0, 0, 2.5, -3], [0, 1.1, 0, 8], [0, 0, 0, 1.0]]),
    ],
)
def test_inverse_mapping_exact_synthetic(affine, tiny_scan):
    rng = np.random.default_rng(1)
    image, label = tiny_scan(rng, (24, 20, 10))
    _, _, label_out, meta = transform.preprocess_arrays(image, affine, "ct", label=label)
    check_inverse_exact(meta, rng)
    # the stored affine maps each preprocessed voxel to the world position it was sampled at
    canonical = nib.as_closest_canonical(nib.Nifti1Image(label, affine))
    start = np.array([b[0] for b in meta["crop_box"]])
    for v in rng.integers(0, meta["shape"], (20, 3)):
        world = np.asarray(meta["affine"]) @ [*v, 1]
        c = np.linalg.solve(canonical.affine, world)[:3]
        r = (v + start) * np.asarray(meta["spacing"]) / nib.affines.voxel_sizes(canonical.affine)
        assert np.allclose(c, r)
        assert (
            label_out[tuple(v)]
            == np.asarray(canonical.dataobj)[
                tuple(np.minimum(np.floor(c + 0.5).astype(int), np.array(canonical.shape) - 1))
            ]
        )


def test_resample_matches_map_coordinates():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(17, 13, 9)).astype(np.float32)
    ratio = np.array([0.7, 1.3, 0.45])
    new_shape = transform.resampled_shape(image.shape, np.ones(3), ratio)
    assert new_shape == tuple(int((n - 1) / r) + 1 for n, r in zip(image.shape, ratio))
    out = transform.resample_image(image, ratio, new_shape)
    grid = np.meshgrid(*[np.arange(n) * r for n, r in zip(new_shape, ratio)], indexing="ij")
    reference = ndimage.map_coordinates(image, grid, order=1, mode="nearest")
    assert np.allclose(out, reference, atol=1e-5)


def test_mri_preset():
    """MRI: resample, clip to the 0.01 / 99.9 percentiles, scale, crop to > 0.3 (Sec. 3.1)."""
    rng = np.random.default_rng(3)
    shape = (30, 26, 14)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    image = np.where(x**2 + (y - 0.2) ** 2 + z**2 < 0.5, 400.0, 5.0) + rng.normal(0, 20, shape)
    image[3, 4, 5] = 1e5  # an outlier, removed by the percentile clip
    affine = np.diag([1.2, 1.2, 2.0, 1.0])
    image01, body, label, meta = transform.preprocess_arrays(image, affine, "mri")
    ratio = 1.5 / np.array([1.2, 1.2, 2.0])
    new_shape = [int(np.floor((n - 1) / r + 1e-6)) + 1 for n, r in zip(shape, ratio)]
    grid = np.meshgrid(*[np.arange(n) * r for n, r in zip(new_shape, ratio)], indexing="ij")
    resampled = ndimage.map_coordinates(image, grid, order=1)
    lo, hi = np.percentile(resampled, [0.01, 99.9])
    scaled = (np.clip(resampled, lo, hi) - lo) / (hi - lo)
    inside = np.argwhere(scaled > 0.3)
    box = [[int(a), int(b) + 1] for a, b in zip(inside.min(0), inside.max(0))]
    assert meta["crop_box"] == box and label is None
    assert np.allclose(image01, scaled[tuple(slice(a, b) for a, b in box)], atol=1e-4)
    assert image01.min() >= 0 and image01.max() <= 1
    assert np.array_equal(body | (image01 > 0.3), body)


@pytest.mark.parametrize(
    "labels, message",
    [
        ({"background": 0, "liver": 1, "spleen": 2}, None),  # nnU-Net v2
        ({"background": 0, "liver": [1, 2], "tumour": 2}, r"region-based labels \(liver\)"),
        ("not json{", "not a valid dataset.json"),
    ],
)
def test_nnunet_v2_and_malformed_dataset_json(tmp_path, labels, message):
    path = tmp_path / "dataset.json"
    path.write_text(
        labels
        if isinstance(labels, str)
        else json.dumps({"labels": labels, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}})
    )
    if message is None:
        assert transform.read_dataset_description(tmp_path) == (
            {"0": "background", "1": "liver", "2": "spleen"},
            ["CT"],
        )
    else:
        with pytest.raises(InputError, match=message) as e:
            transform.read_dataset_description(tmp_path)
        assert str(path) in str(e.value)


def test_zero_length_axis_is_named(tmp_path):
    with pytest.raises(InputError, match=r"scan.nii.gz: an empty axis in shape \(20, 0, 8\)"):
        transform.validate_case(
            np.zeros((20, 0, 8), np.int16), AFFINE, names=("scan.nii.gz", "label")
        )


def test_a_spacing_that_is_no_spacing_is_a_bug_here():
    """The flags are typed (preprocess.py refuses them where they are parsed); make_preset's own
    check is an internal contract, a ValueError with its traceback."""
    for spacing in ([float("nan"), 1, 1], [0, 1, 1], [-1, 1, 2]):
        with pytest.raises(ValueError, match="spacing must be 3 positive numbers"):
            transform.make_preset("ct", spacing)
