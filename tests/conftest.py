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
