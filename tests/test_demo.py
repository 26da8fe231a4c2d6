"""demo.py and `preprocess.py --demo`: the phantoms are deterministic per seed, the demo command
builds the labelled set with its split and a separate unlabelled corpus (none of its scans is a
labelled one), a folder made with other settings or too few cases is one line."""

import json

import nibabel as nib
import numpy as np
import pytest

import demo
import preprocess
from data import InputError


def test_demo_generator_deterministic(tmp_path):
    def make(folder, seed):
        for job in demo.raw_jobs(tmp_path / folder, 1, seed=seed):
            demo.write_case(job)
        img = nib.load(str(tmp_path / folder / "imagesTr" / "demo_000.nii.gz"))
        lab = nib.load(str(tmp_path / folder / "labelsTr" / "demo_000.nii.gz"))
        return np.asarray(img.dataobj).tobytes() + np.asarray(lab.dataobj).tobytes(), img.affine

    a, b, c = make("a", 7), make("b", 7), make("c", 8)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert a[0] != c[0]
    assert demo.raw_jobs(tmp_path / "a", 1, seed=7) == []  # made already: nothing to do


def test_demo_command(tmp_path, capsys):
    """`preprocess.py --demo DIR` with three labelled cases (the fewest a split takes) and three
    unlabelled ones: preprocessed like real data, a fixed split, a corpus apart."""
    args = preprocess.parse_args(
        [
            "--demo",
            str(tmp_path / "d"),
            "--num-cases",
            "3",
            "--unlabelled-cases",
            "3",
            "--workers",
            "1",
        ]
    )
    assert preprocess.main(args) == 0
    out = capsys.readouterr().out
    assert (
        "done 3 / skipped 0 / failed 0" in out
        and "3 labelled phantoms" in out
        and "3 unlabelled ones" in out
    )
    folder = tmp_path / "d"
    meta = json.loads((folder / "cases" / "demo_000" / "meta.json").read_text())
    image = np.load(folder / "cases" / "demo_000" / "image.npy")
    assert list(image.shape) == meta["shape"] and meta["spacing"] == [1.0, 1.0, 2.0]
    assert 0 <= image.min() and image.max() <= 1
    split = json.loads((folder / "split.json").read_text())
    assert sorted(sum(split.values(), [])) == ["demo_000", "demo_001", "demo_002"] and all(
        split.values()
    )
    info = json.loads((folder / "unlabelled" / "dataset.json").read_text())
    assert len(info["cases"]) == 3 and not any(c["labelled"] for c in info["cases"])
    raw_l = [
        np.asanyarray(nib.load(p).dataobj) for p in sorted((folder / "raw" / "imagesTr").iterdir())
    ]
    raw_u = [
        np.asanyarray(nib.load(p).dataobj)
        for p in sorted((folder / "unlabelled").glob("raw/*.nii.gz"))
    ]
    assert len(raw_u) == 3 and not any(
        a.shape == b.shape and np.array_equal(a, b) for a in raw_l for b in raw_u
    )
    # the same command again finishes at once; another demo into the same folder is a clear error,
    # not a mix
    assert preprocess.main(args) == 0 and "done 0 / skipped 3" in capsys.readouterr().out
    with pytest.raises(
        InputError, match=r"raw holds a run with other settings \(--num-cases 3 -> 4\)"
    ):
        preprocess.main(
            preprocess.parse_args(
                ["--demo", str(folder), "--num-cases", "4", "--unlabelled-cases", "0"]
            )
        )
    preprocess.main(
        preprocess.parse_args(
            ["--demo", str(folder), "--num-cases", "4", "--unlabelled-cases", "0", "--force"]
        )
    )
    assert len(json.loads((folder / "dataset.json").read_text())["cases"]) == 4


def test_demo_of_too_few_cases_or_onto_a_file_is_one_line(tmp_path):
    with pytest.raises(InputError, match="--num-cases 1: the demo's split needs at least 3"):
        preprocess.build_demo(tmp_path / "d", num_cases=1, unlabelled_cases=0)
    assert not (tmp_path / "d").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot be a folder"):
        preprocess.build_demo(tmp_path / "file", num_cases=3, unlabelled_cases=0)
    assert (tmp_path / "file").read_text() == "x"


def test_demo_split_is_disjoint_and_fixed():
    ids = [f"demo_{i:03d}" for i in range(20)]
    split = demo.demo_split(ids, seed=0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [12, 3, 5]
    assert sorted(sum(split.values(), [])) == ids and split == demo.demo_split(ids, seed=0)


@pytest.mark.parametrize("flag", ["--num-cases", "--unlabelled-cases"])
def test_demo_sizes_are_bounded_before_any_work(tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as e:
        preprocess.parse_args(["--demo", str(tmp_path / "d"), flag, "100000000"])
    assert e.value.code == 2 and "at most 10000 demo phantoms" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
