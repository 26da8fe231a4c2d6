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
    return preprocess.build_demo(tmp_path_factory.mktemp("small_demo"), num_cases=4, unlabelled_cases=3, seed=0)


@pytest.fixture(scope="session")
def small_unlabelled(small_demo):
    """3 unlabelled phantoms of the demo's separate pretraining stream (what pretrain.py --data demo reads)."""
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
    import json
    import nibabel as nib
    import numpy as np
    import demo
    root = tmp_path_factory.mktemp("two_channel")
    raw = Path(small_demo) / "raw"
    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    folders = {}
    for layout in ("nnunet", "decathlon"):
        folder = folders[layout] = root / layout
        (folder / "imagesTr").mkdir(parents=True)
        (folder / "labelsTr").mkdir()
        for i, scan in enumerate(sorted((raw / "imagesTr").iterdir())):
            img = nib.load(scan)
            ct = np.asanyarray(img.dataobj).astype(np.float32)
            t2 = demo.t2_like(ct, np.random.default_rng([9, i]))
            case = scan.name[:-len(".nii.gz")]
            if layout == "nnunet":
                nib.save(nib.Nifti1Image(ct.astype(np.int16), img.affine), folder / "imagesTr" / f"{case}_0000.nii.gz")
                nib.save(nib.Nifti1Image(t2, img.affine), folder / "imagesTr" / f"{case}_0001.nii.gz")
            else:
                nib.save(nib.Nifti1Image(np.stack([ct, t2], -1), img.affine), folder / "imagesTr" / scan.name)
            nib.save(nib.load(raw / "labelsTr" / scan.name), folder / "labelsTr" / scan.name)
        names = {"0": "CT", "1": "T2"}
        (folder / "dataset.json").write_text(json.dumps(
            dict(channel_names=names, labels={v: int(k) for k, v in labels.items()}, file_ending=".nii.gz")
            if layout == "nnunet" else dict(modality=names, labels=labels)))
    return folders
