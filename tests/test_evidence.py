"""evidence.py --quick: the whole evidence pipeline (pretrain both methods, probe three inits,
fine-tune vs scratch, here at one budget) runs end to end on the small demo set. It checks that the
pipeline runs and produces its table, not the numbers (those need the full run)."""
import json

import evidence


def test_quick_evidence_runs_end_to_end(small_demo, tmp_path):
    rows = evidence.main(evidence.parse_args(["--quick", "--data", str(small_demo), "--out", str(tmp_path)]))
    assert len(rows) == 3 + 2 + 2  # --quick: one label budget, with and without augmentation
    table = (tmp_path / "evidence.md").read_text()
    for name in ["random init", "vox2vec", "ours", "from scratch", "fine-tuned (ours)", "chance ln(2N-1)"]:
        assert name in table
    for png in ["dice_vs_labels.png", "segmentation_slice.png", "feature_pca.png", "pretraining_curves.png"]:
        assert (tmp_path / png).stat().st_size > 1000
    saved = json.loads((tmp_path / "evidence.json").read_text())
    assert all(0.0 <= r["mean_dice"] <= 1.0 for r in saved["results"])
    assert len(saved["commands"]) == 2 + 3 + 4
