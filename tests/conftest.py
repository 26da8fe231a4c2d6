"""Shared fixtures: one small demo set (4 labelled phantoms and 3 unlabelled ones at the demo
scale) built once per test session through the same path as `preprocess.py --demo`."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import preprocess  # noqa: E402


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    return preprocess.build_demo(
        tmp_path_factory.mktemp("small_demo"), num_cases=4, unlabelled_cases=3, seed=0
    )


@pytest.fixture(scope="session")
def small_unlabelled(small_demo):
    """3 unlabelled phantoms of the demo's own pretraining stream (what pretrain.py --data demo
    reads)."""
    return Path(small_demo) / "unlabelled"


@pytest.fixture
def demo_is_small(small_demo, monkeypatch):
    """Make `--data demo` resolve to the small set, so the scripts' demo path runs in seconds."""
    monkeypatch.setattr(data, "DEMO_DIR", Path(small_demo))
    return small_demo


@pytest.fixture(scope="session")
def two_channel_raw(small_demo, tmp_path_factory):
    """The demo's labelled phantoms as 2-channel raw datasets, CT and demo.t2_like's MRI-like
    contrast: {"nnunet": CASE_0000 / CASE_0001 files with channel_names (nnU-Net v2), "decathlon":
    one 4-D image per case with modality (Decathlon v1)}."""
    import demo

    root = tmp_path_factory.mktemp("two_channel")
    return {
        layout: demo.multichannel_raw(Path(small_demo) / "raw", root / layout, layout=layout)
        for layout in ("nnunet", "decathlon")
    }


@pytest.fixture(scope="session")
def backbone(small_demo, tmp_path_factory):
    """A one-step demo backbone.pt of the small demo (the probe's and fine-tuning's tests start
    from it)."""
    import pretrain

    out = tmp_path_factory.mktemp("pre")
    pretrain.main(
        pretrain.parse_args(
            [
                "--data",
                str(small_demo),
                "--out",
                str(out),
                "--preset",
                "demo",
                "--steps",
                "1",
                "--patch-size",
                "16",
                "16",
                "16",
                "--batch-pairs",
                "2",
                "--num-voxels",
                "16",
                "--workers",
                "0",
            ]
        )
    )
    return out / "backbone.pt"


# ----------------------------------------------------------------------------- tiny raw scans


def _tiny_scan(rng, shape=(20, 18, 8)):
    """A small CT-like scan: an ellipse of soft tissue (HU) in air, two label blobs -> (int16
    image, uint8 label)."""
    import numpy as np

    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.7) ** 2 < 1
    image = np.where(inside, 40.0, -1000.0) + rng.normal(0, 10, shape)
    label = np.zeros(shape, np.uint8)
    label[inside & (x > 0.2)] = 1
    label[inside & (x < -0.3) & (y > 0)] = 2
    return image.astype(np.int16), label


def _save(path, array, affine):
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _load_case(data_dir, case_id):
    """A preprocessed case read plainly -> (meta, {image, body, label: arrays})."""
    import json
    import numpy as np

    folder = Path(data_dir) / "cases" / case_id
    meta = json.loads((folder / "meta.json").read_text())
    return meta, {
        n: np.load(folder / f"{n}.npy")
        for n in ("image", "body", "label")
        if (folder / f"{n}.npy").is_file()
    }


@pytest.fixture
def tiny_scan():
    return _tiny_scan


@pytest.fixture
def save_scan():
    return _save


@pytest.fixture
def load_case():
    return _load_case
