"""Shared fixtures: one small demo set (4 phantoms at the demo scale) built once per test session
through the same path as `preprocess.py --demo`, and tiny model settings for CPU tests."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    return demo.prepare_demo(tmp_path_factory.mktemp("small_demo"), num_cases=4, seed=0)


@pytest.fixture
def demo_is_small(small_demo, monkeypatch):
    """Make `--data demo` resolve to the small set, so the scripts' demo path runs in seconds."""
    monkeypatch.setattr(demo, "ensure_demo", lambda: Path(small_demo))
    return small_demo


@pytest.fixture(scope="session")
def small_unlabelled(tmp_path_factory):
    """3 unlabelled phantoms of the demo's separate pretraining stream."""
    return demo.prepare_unlabelled_demo(tmp_path_factory.mktemp("small_unlabelled"), num_cases=3, seed=0)
