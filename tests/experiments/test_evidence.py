"""experiments/evidence.py --quick: the whole protocol (pretraining on the separate corpus and on
the labelled
pool, the probe along pretraining, the shortcut diagnostic, the recipe grid and the paired draws)
runs end to end on the small demo set and writes the report's headline keys; --neighbours then runs
on the same folder. It checks that the pipeline runs and produces its tables, not the numbers
(those need the full run)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from experiments import evidence

ROOT = Path(__file__).resolve().parents[2]


def test_quick_evidence_runs_end_to_end(small_demo, small_unlabelled, tmp_path, monkeypatch):
    out = tmp_path / "ev"
    evidence.main(
        evidence.parse_args(
            [
                "--quick",
                "--data",
                str(small_demo),
                "--unlabelled",
                str(small_unlabelled),
                "--out",
                str(out),
            ]
        )
    )
    s = json.loads((out / "evidence.json").read_text())
    assert s["corpus"]["unlabelled_cases"] == 3 and s["corpus"]["labelled_cases"] == 4
    assert set(s["probe"]) >= {"random", "vox2vec", "ours"}
    assert set(s["finetune_1"]) >= {"scratch", "pretrained", "paired_diff", "ci95"}
    assert (
        s["finetune_1"]["ci95"][0] <= s["finetune_1"]["paired_diff"] <= s["finetune_1"]["ci95"][1]
    )
    assert set(s["shortcut"]) >= {
        "retrieval_small_offset",
        "retrieval_large_offset",
        "r2_random_init",
        "r2_ours",
    }
    assert s["wall_minutes"] > 0
    assert all(0.0 <= v <= 1.0 for v in s["probe"].values())
    assert set(s["chosen_recipe"]) == {"scratch", "pretrained"} and len(s["grid"]) == 2 * 2
    assert (
        len(s["finetune_1"]["train_cases"]) == 1
    )  # one draw (pairing: test_paired_arms_receive_identical_inputs)
    table = (out / "evidence.md").read_text()
    for name in [
        "random init",
        "vox2vec",
        "ours",
        "from scratch",
        "fine-tuned (ours)",
        "Paired difference",
        "R^2",
    ]:
        assert name in table
    for png in [
        "probe_vs_pretraining.png",
        "dice_vs_finetune_steps.png",
        "segmentation_slice.png",
        "feature_pca.png",
        "pretraining_curves.png",
    ]:
        assert (out / png).stat().st_size > 1000
    # 3 pretrainings (ours and vox2vec to the end of the curve, the pool control), 7 probes (2
    # methods x
    # 3 steps + the pool control), 4 grid cells, 1 draw x 2 arms, the quick start's cell
    assert len(s["commands"]) == 3 + 7 + 4 + 2 + 1
    assert set(s["quick_start"]) >= {"probe", "probe_random", "finetune_1", "scratch_1"}
    # a second invocation skips every finished command
    evidence.main(
        evidence.parse_args(
            [
                "--quick",
                "--data",
                str(small_demo),
                "--unlabelled",
                str(small_unlabelled),
                "--out",
                str(out),
                "--no-figures",
            ]
        )
    )
    saved = json.loads((out / "evidence.json").read_text())
    assert all(c["seconds"] is None for c in saved["commands"])
    assert saved["probe"] == s["probe"] and saved["finetune_1"] == s["finetune_1"]

    # --neighbours on the same folder, one pretraining method (DenseCL: the matching diagnostic
    # needs it) plus MedContext from scratch and on top of ours, paired against the main run
    monkeypatch.setattr(evidence, "NEIGHBOURS", ("densecl",))
    n = evidence.neighbours(
        evidence.parse_args(
            [
                "--neighbours",
                "--quick",
                "--data",
                str(small_demo),
                "--unlabelled",
                str(small_unlabelled),
                "--out",
                str(out),
            ]
        )
    )
    assert set(n["rows"]) == {"random init", "ours", "densecl", "medcontext", "medcontext + ours"}
    assert n["rows"]["ours"]["paired_diff"] == s["finetune_1"]["paired_diff"]
    assert all(len(r["per_draw"]) == 1 for r in n["rows"].values())
    assert set(n["agreement"]) == {"random init", "ours", "densecl"}
    assert all(0.0 <= v <= 1.0 for v in n["agreement"].values()) and n["wall_minutes"] > 0
    assert "medcontext + ours" in (out / "neighbours.md").read_text()


def test_own_data_needs_an_unlabelled_corpus(small_demo, tmp_path):
    """--data DIR without --unlabelled: one line, before any work (pretraining must not read the
    labelled set)."""
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "evidence.py"),
            "--data",
            str(small_demo),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "--unlabelled" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_evidence_refuses_a_corpus_that_is_not_apart_or_a_set_too_small(
    small_demo, small_unlabelled, tmp_path
):
    evidence_py = [sys.executable, str(ROOT / "experiments" / "evidence.py"), "--quick"]
    same = subprocess.run(
        [
            *evidence_py,
            "--data",
            str(small_demo),
            "--unlabelled",
            str(small_demo),
            "--out",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
    )
    assert same.returncode == 2 and "is not kept apart from --data" in same.stderr
    copy = tmp_path / "copy"  # the labelled scans, preprocessed again elsewhere
    shutil.copytree(small_demo, copy, ignore=shutil.ignore_patterns("raw", "unlabelled"))
    mixed = subprocess.run(
        [
            *evidence_py,
            "--data",
            str(small_demo),
            "--unlabelled",
            str(copy),
            "--out",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
    )
    assert mixed.returncode == 2 and "of its scans are labelled cases" in mixed.stderr
    small = tmp_path / "small"
    shutil.copytree(
        small_demo, small, ignore=shutil.ignore_patterns("raw", "split.json", "unlabelled")
    )
    info = json.loads((small / "dataset.json").read_text())
    for case in info["cases"][2:]:
        case["labelled"] = False
    (small / "dataset.json").write_text(json.dumps(info))
    tiny = subprocess.run(
        [
            *evidence_py,
            "--data",
            str(small),
            "--unlabelled",
            str(small_unlabelled),
            "--out",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        tiny.returncode == 2 and "2 labelled case(s)" in tiny.stderr and "at least 3" in tiny.stderr
    )
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    onto = subprocess.run(
        [
            *evidence_py,
            "--data",
            str(small_demo),
            "--unlabelled",
            str(small_unlabelled),
            "--out",
            str(taken),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        onto.returncode == 2
        and "cannot be a folder (a file of that name exists)" in onto.stderr
        and taken.read_text() == "mine"
    )
    for r in (same, mixed, tiny, onto):
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c" / "pretrain-ours").exists()
