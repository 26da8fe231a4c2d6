"""experiments/evidence.py --quick: the whole protocol (pretraining on the separate corpus and on the labelled
pool, the probe along pretraining, the shortcut diagnostic, the recipe grid and the paired draws)
runs end to end on the small demo set and writes the report's headline keys; --neighbours then runs
on the same folder. It checks that the pipeline runs and produces its tables, not the numbers
(those need the full run)."""
import json
import subprocess
import sys
from pathlib import Path

from experiments import evidence

ROOT = Path(__file__).resolve().parents[1]


def test_quick_evidence_runs_end_to_end(small_demo, small_unlabelled, tmp_path, monkeypatch):
    out = tmp_path / "ev"
    evidence.main(evidence.parse_args(["--quick", "--data", str(small_demo), "--unlabelled", str(small_unlabelled),
                                       "--out", str(out)]))
    s = json.loads((out / "evidence.json").read_text())
    assert s["corpus"]["unlabelled_cases"] == 3 and s["corpus"]["labelled_cases"] == 4
    assert set(s["probe"]) >= {"random", "vox2vec", "ours"}
    assert set(s["finetune_1"]) >= {"scratch", "pretrained", "paired_diff", "ci95"}
    assert s["finetune_1"]["ci95"][0] <= s["finetune_1"]["paired_diff"] <= s["finetune_1"]["ci95"][1]
    assert set(s["shortcut"]) >= {"retrieval_small_offset", "retrieval_large_offset", "r2_random_init", "r2_ours"}
    assert s["wall_minutes"] > 0
    assert all(0.0 <= v <= 1.0 for v in s["probe"].values())
    assert set(s["chosen_recipe"]) == {"scratch", "pretrained"} and len(s["grid"]) == 2 * 2
    assert len(s["finetune_1"]["train_cases"]) == 1     # one draw (pairing: test_paired_arms_receive_identical_inputs)
    table = (out / "evidence.md").read_text()
    for name in ["random init", "vox2vec", "ours", "from scratch", "fine-tuned (ours)", "Paired difference", "R^2"]:
        assert name in table
    for png in ["probe_vs_pretraining.png", "dice_vs_finetune_steps.png", "segmentation_slice.png", "feature_pca.png",
                "pretraining_curves.png"]:
        assert (out / png).stat().st_size > 1000
    # 3 pretrainings (ours and vox2vec to the end of the curve, the pool control), 7 probes (2 methods x
    # 3 steps + the pool control), 4 grid cells, 1 draw x 2 arms, the quick start's cell
    assert len(s["commands"]) == 3 + 7 + 4 + 2 + 1
    assert set(s["quick_start"]) >= {"probe", "probe_random", "finetune_1", "scratch_1"}
    # a second invocation skips every finished command
    evidence.main(evidence.parse_args(["--quick", "--data", str(small_demo), "--unlabelled", str(small_unlabelled),
                                               "--out", str(out), "--no-figures"]))
    saved = json.loads((out / "evidence.json").read_text())
    assert all(c["seconds"] is None for c in saved["commands"])
    assert saved["probe"] == s["probe"] and saved["finetune_1"] == s["finetune_1"]

    # --neighbours on the same folder, one pretraining method (DenseCL: the matching diagnostic
    # needs it) plus MedContext from scratch and on top of ours, paired against the main run
    monkeypatch.setattr(evidence, "NEIGHBOURS", ("densecl",))
    n = evidence.neighbours(evidence.parse_args(["--neighbours", "--quick", "--data", str(small_demo),
                                                 "--unlabelled", str(small_unlabelled), "--out", str(out)]))
    assert set(n["rows"]) == {"random init", "ours", "densecl", "medcontext", "medcontext + ours"}
    assert n["rows"]["ours"]["paired_diff"] == s["finetune_1"]["paired_diff"]
    assert all(len(r["per_draw"]) == 1 for r in n["rows"].values())
    assert set(n["agreement"]) == {"random init", "ours", "densecl"}
    assert all(0.0 <= v <= 1.0 for v in n["agreement"].values()) and n["wall_minutes"] > 0
    assert "medcontext + ours" in (out / "neighbours.md").read_text()


def test_own_data_needs_an_unlabelled_corpus(small_demo, tmp_path):
    """--data DIR without --unlabelled: one line, before any work (pretraining must not read the labelled set)."""
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "evidence.py"), "--data", str(small_demo), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--unlabelled" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
