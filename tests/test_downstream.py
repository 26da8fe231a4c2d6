"""linear_probe.py and finetune.py: frozen probe, fine-tune schedule, results.json, clear errors,
and prediction written back onto the scan's own grid."""
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import supervised_augment as augment
import data
import downstream
import finetune
import predict
import linear_probe
import pretrain
import preprocess
from model import FPN3d, SegmentationModel

PROBE_TINY = ["--eval-patch-size", "64", "64", "32", "--folds", "2", "--fold", "0", "--preset", "demo"]
TINY = ["--steps", "3", "--batch-size", "1", "--patch-size", "16", "16", "8", "--workers", "0", "--warmup-steps", "0",
        "--bn-batches", "2", *PROBE_TINY]


@pytest.fixture(scope="module")
def backbone(small_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    pretrain.main(pretrain.parse_args(["--data", str(small_demo), "--out", str(out), "--preset", "demo",
                                       "--steps", "1", "--patch-size", "16", "16", "16", "--batch-pairs", "2",
                                       "--num-voxels", "16", "--workers", "0"]))
    return out / "backbone.pt"


def test_linear_probe_trains_only_the_head(small_demo, backbone, tmp_path, monkeypatch):
    """The probe trains the head on cached pyramids: the backbone is never called inside the
    training loop, and its weights and BatchNorm buffers are unchanged afterwards."""
    seen = {}
    real = linear_probe.train_head

    def spy(head, cache, labels, train_ids, cfg, device, *a, **k):
        model = seen["model"] = next(m for m in spy.models if m.head is head)
        assert not any(p.requires_grad for p in model.backbone.parameters())
        assert all(not m.training for m in model.backbone.modules())           # eval mode: BN frozen
        seen["before"] = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        seen["head"] = {k: v.clone() for k, v in head.state_dict().items()}
        with monkeypatch.context() as m:    # any backbone call in the loop fails the test
            m.setattr(FPN3d, "forward", lambda *a: pytest.fail("backbone called while training the head"))
            out = real(head, cache, labels, train_ids, cfg, device, *a, **k)
        seen["after"], seen["head_after"] = model.backbone.state_dict(), head.state_dict()
        return out

    spy.models = []
    real_build = downstream.build_segmenter

    def build(*a, **k):
        model, info = real_build(*a, **k)
        spy.models.append(model)
        return model, info

    monkeypatch.setattr(linear_probe, "train_head", spy)
    monkeypatch.setattr(downstream, "build_segmenter", build)
    results = linear_probe.main(linear_probe.parse_args(["--data", str(small_demo), "--checkpoint", str(backbone),
                                                         "--out", str(tmp_path), *PROBE_TINY, "--max-steps", "5"]))
    for k, v in seen["before"].items():       # weights and BN running statistics untouched
        assert torch.equal(v, seen["after"][k]), k
    assert any(not torch.equal(v, seen["head_after"][k]) for k, v in seen["head"].items())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"mean_dice", "std_dice", "per_class", "folds", "args", "checkpoint", "head_training"} <= set(saved)
    assert saved["checkpoint"] == str(backbone) and 0.0 <= saved["mean_dice"] <= 1.0
    assert saved["head_training"]["0"]["steps"] == 5
    assert saved == json.loads(json.dumps(results))


def test_head_on_cached_features_equals_the_frozen_model():
    """head(cached pyramid) == the frozen model run on the same volume (odd sizes, eval mode),
    the standardisation included; the cache is float16, hence the tolerance."""
    torch.manual_seed(0)
    model = SegmentationModel(dict(in_channels=1, base_channels=4, num_levels=3), 5, head="linear").eval()
    for m in model.backbone.modules():       # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    image = np.random.default_rng(0).random((21, 18, 11), dtype=np.float32)
    levels = linear_probe.compute_pyramid(model.backbone, image, (64, 64, 32), torch.device("cpu"))
    assert [a.shape[1:] for a in levels] == [(21, 18, 11), (11, 9, 6), (6, 5, 3)] and levels[0].dtype == np.float16
    means, stds = linear_probe.channel_statistics({"a": levels}, ["a"])
    for l, a in enumerate(levels):             # statistics against numpy
        flat = a.astype(np.float64).reshape(a.shape[0], -1)
        np.testing.assert_allclose(means[l].numpy(), flat.mean(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stds[l].numpy(), flat.std(1), rtol=1e-4, atol=1e-6)
    model.head.set_statistics(means, stds)
    with torch.no_grad():
        direct = model(torch.from_numpy(image)[None, None])
        cached = model.head(linear_probe.as_tensors(levels, torch.device("cpu")))
    torch.testing.assert_close(cached, direct, atol=2e-2, rtol=1e-2)
    # a volume larger than the window: tiled, every level on its own grid
    tiled = linear_probe.compute_pyramid(model.backbone, image, (8, 8, 8), torch.device("cpu"))
    assert [a.shape for a in tiled] == [a.shape for a in levels]


def test_sampled_voxel_logits_equal_the_full_volume_logits():
    """The head trained on gathered voxels is the head evaluated as a convolution: at every sampled
    voxel of an odd-sized volume, forward_voxels(gathered levels) == head(pyramid) there."""
    torch.manual_seed(0)
    model = SegmentationModel(dict(in_channels=1, base_channels=4, num_levels=3), 5, head="linear").eval()
    image = np.random.default_rng(1).random((21, 18, 11), dtype=np.float32)
    levels = linear_probe.compute_pyramid(model.backbone, image, (64, 64, 32), torch.device("cpu"))
    model.head.set_statistics(*linear_probe.channel_statistics({"a": levels}, ["a"]))
    with torch.no_grad():
        for conv in model.head.convs:                     # weights that are not small
            conv.weight.normal_()
        model.head.convs[0].bias.normal_()
        label = np.random.default_rng(2).integers(0, 5, (21, 18, 11))
        coords, y, counts = linear_probe.sample_voxels(label, 5, 40, np.random.default_rng(3))
        assert all((coords.max(0) < (21, 18, 11)).tolist()) and np.array_equal(label[tuple(coords.T)], y)
        voxels = model.head.forward_voxels(linear_probe.gather_levels(levels, coords))        # (n, 5)
        full = model.head(linear_probe.as_tensors(levels, torch.device("cpu")))[0]           # (5, X, Y, Z)
    torch.testing.assert_close(voxels, full[:, coords[:, 0], coords[:, 1], coords[:, 2]].T, atol=1e-4, rtol=1e-5)


def test_voxel_sample_is_class_balanced():
    label = np.zeros((30, 20, 10), np.int64)
    label[:5, :4, :2] = 3                                 # 40 voxels
    label[10:20] = 1                                      # 2000 voxels
    coords, y, counts = linear_probe.sample_voxels(label, 5, 100, np.random.default_rng(0))
    assert np.bincount(y, minlength=5).tolist() == [100, 100, 0, 40, 0]        # min(count, per class)
    assert counts.tolist() == np.bincount(label.ravel(), minlength=5).tolist()
    assert len(np.unique(coords, axis=0)) == len(coords)                      # without replacement
    assert np.array_equal(label[tuple(coords.T)], y)


def test_linear_probe_random_init(small_demo, tmp_path):
    r = linear_probe.main(linear_probe.parse_args(["--data", str(small_demo), "--init", "random",
                                                   "--out", str(tmp_path), *PROBE_TINY, "--max-steps", "3"]))
    assert r["init"] == "random" and r["checkpoint"] is None


def test_summary_ignores_absent_classes():
    names = {0: "bg", 1: "a", 2: "b"}
    fold = {0: np.array([[1.0, np.nan], [0.5, 0.0]])}   # class b absent from case 0: ignored there
    r = downstream.summarise(fold, names)
    assert r["per_class"] == {"a": 0.75, "b": 0.0}
    assert r["mean_dice"] == pytest.approx(np.mean([1.0, 0.25]))


def test_fold_split_partitions_the_cases():
    ids = [f"c{i}" for i in range(10)]
    folds = downstream.split_folds(ids, 3, seed=0)
    tests = sum((te for _, te in folds), [])
    assert sorted(tests) == ids
    for tr, te in folds:
        assert not set(tr) & set(te) and sorted(tr + te) == ids


@pytest.mark.parametrize("problem", ["missing", "not_a_backbone", "wrong_architecture"])
def test_bad_checkpoint_is_a_clear_error(small_demo, backbone, tmp_path, problem):
    path = tmp_path / "ckpt.pt"
    if problem == "not_a_backbone":
        shutil.copy(backbone.with_name("checkpoint.pt"), path)      # the resumable file, not the backbone
    elif problem == "wrong_architecture":
        ckpt = torch.load(backbone, weights_only=True)
        ckpt["backbone_config"]["num_levels"] += 1
        torch.save(ckpt, path)
    with pytest.raises(SystemExit) as e:
        linear_probe.main(linear_probe.parse_args(["--data", str(small_demo), "--checkpoint", str(path),
                                                   "--out", str(tmp_path / "o"), *PROBE_TINY]))
    assert str(path) in str(e.value.code)


def test_different_label_sets_are_a_clear_error(small_demo, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(small_demo, other, ignore=shutil.ignore_patterns("raw"))
    meta = json.loads((other / "dataset.json").read_text())
    meta["labels"]["1"] = "something_else"
    (other / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="label sets differ"):
        finetune.main(finetune.parse_args(["--data", str(small_demo), "--test-data", str(other), "--init", "random",
                                           "--out", str(tmp_path / "o"), *TINY]))


def test_backbone_lr_schedule():
    cfg = dict(freeze_steps=100, ramp_steps=10, ramp_start_lr=3e-5, lr=3e-4, backbone_lr_scale=1.0)
    assert finetune.backbone_lr(0, cfg) == 0 and finetune.backbone_lr(99, cfg) == 0
    assert finetune.backbone_lr(100, cfg) == pytest.approx(3e-5)
    assert finetune.backbone_lr(105, cfg) == pytest.approx(math.sqrt(3e-5 * 3e-4))   # exponential ramp
    assert finetune.backbone_lr(110, cfg) == finetune.backbone_lr(10_000, cfg) == 3e-4


def test_backbone_lr_scale_and_warmup():
    cfg = dict(freeze_steps=0, ramp_steps=0, ramp_start_lr=3e-5, lr=3e-4, backbone_lr_scale=0.1, warmup_steps=4)
    assert finetune.backbone_lr(0, cfg) == pytest.approx(3e-5) and finetune.backbone_lr(50, cfg) == pytest.approx(3e-5)
    assert [finetune.warmup(s, cfg) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert finetune.warmup(0, dict(cfg, warmup_steps=0)) == 1.0


@pytest.mark.parametrize("frozen_bn", ["eval", "train"])
def test_frozen_backbone_batchnorm_eval_or_train(frozen_bn):
    """While the backbone is frozen: with eval nothing of it changes; with train only its BatchNorm
    weights and statistics do (Lightning's train_bn), at the head's lr; the head trains in both."""
    torch.manual_seed(0)
    model = SegmentationModel(dict(in_channels=1, base_channels=4, num_levels=2), 3, head="nonlinear").train()
    cfg = dict(freeze_steps=10, ramp_steps=2, ramp_start_lr=1e-4, lr=1e-2, backbone_lr_scale=1.0, warmup_steps=0,
               frozen_bn=frozen_bn)
    optimizer = finetune.make_optimizer(model, cfg["lr"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(2, 1, 16, 16, 8), torch.randint(0, 3, (2, 16, 16, 8))
    for step in range(3):
        finetune.apply_schedule(step, model, optimizer, cfg)
        loss = finetune.segmentation_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    norm_modules = {n for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm3d)}
    bn = {k for k in before if k.startswith("backbone.") and k.rsplit(".", 1)[0][len("backbone."):] in norm_modules}
    assert any(k.startswith("head.") for k in changed)
    if frozen_bn == "eval":
        assert not any(k.startswith("backbone.") for k in changed)
    else:
        assert {k for k in changed if k.startswith("backbone.")} == bn
    group = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert group["backbone"] == 0 and group["backbone_bn"] == (0 if frozen_bn == "eval" else cfg["lr"])


def test_weight_change_per_level():
    torch.manual_seed(0)
    model = SegmentationModel(dict(in_channels=1, base_channels=4, num_levels=3), 3, head="nonlinear")
    initial = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert all(v == 0 for v in finetune.weight_change(model, initial).values())
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if name.startswith(("encoder.2.", "decoder.2.", "lateral.2.", "skip.2.", "down.2.")):
                p.mul_(2.0)                                     # level 2 moves by exactly ||w0||
    change = finetune.weight_change(model, initial)
    assert change["2"] == pytest.approx(1.0) and change["0"] == 0 and change["1"] == 0


def test_finetune_freezes_then_trains_backbone(small_demo, backbone, tmp_path, monkeypatch):
    snapshots = []
    real = finetune.apply_schedule

    def recording(step, model, optimizer, cfg):
        snapshots.append((step, model.backbone.stem.weight.detach().clone()
                          if hasattr(model.backbone, "stem") else next(model.backbone.parameters()).detach().clone()))
        real(step, model, optimizer, cfg)

    monkeypatch.setattr(finetune, "apply_schedule", recording)
    finetune.main(finetune.parse_args(["--data", str(small_demo), "--checkpoint", str(backbone), "--out", str(tmp_path),
                                       *TINY, "--steps", "5", "--freeze-steps", "2", "--ramp-steps", "2"]))
    w = dict(snapshots)
    assert torch.equal(w[0], w[2])          # frozen for steps 0 and 1
    assert not torch.equal(w[2], w[4])      # trained after the freeze
    saved = torch.load(tmp_path / "model_fold0.pt", weights_only=True)
    assert saved["kind"] == "segmenter" and saved["modality"] == "ct"


def test_predict_writes_mask_on_the_original_grid(small_demo, backbone, tmp_path, monkeypatch):
    finetune.main(finetune.parse_args(["--data", str(small_demo), "--init", "random", "--out", str(tmp_path), *TINY,
                                       "--steps", "1"]))
    raw = Path(small_demo) / "raw"
    scan = sorted((raw / "imagesTr").iterdir())[0]
    label_file = raw / "labelsTr" / scan.name.replace("_0000", "")
    out = tmp_path / "pred"
    seg = out / scan.name
    predict_one = lambda *extra: predict.main(predict.parse_args(["-i", str(scan), "-o", str(out), "--model",
                                                                  str(tmp_path / "model_fold0.pt"), *extra]))
    assert predict_one() == 0
    written, original = nib.load(seg), nib.load(label_file)
    assert written.shape == original.shape and np.allclose(written.affine, original.affine)

    # Alignment: with an oracle in place of the network (the preprocessed label itself), the
    # mask that predict.py writes must coincide with the label on the scan's own grid.
    image, affine = preprocess.load_nifti(scan)
    label = np.asanyarray(original.dataobj)
    _, _, label_pre, meta = preprocess.preprocess_arrays(image, affine, "ct", label=label)
    oracle = torch.nn.functional.one_hot(torch.as_tensor(label_pre.astype(np.int64)), 9).permute(3, 0, 1, 2).float()
    monkeypatch.setattr(predict, "ensemble_probabilities", lambda *a, **k: oracle)
    before = seg.read_bytes()
    assert predict_one() == 0 and seg.read_bytes() == before          # no silent overwrite: the case is skipped
    assert predict_one("--force") == 0
    pred = np.asanyarray(nib.load(seg).dataobj)
    # exactly the nearest-neighbour round trip of the label (the best any network could do) ...
    np.testing.assert_array_equal(pred, preprocess.to_original_grid(label_pre, meta))
    # ... which lies on the label: the round trip 0.86 -> 1 -> 0.86 mm loses boundary voxels of
    # the demo's few-voxel-thick organs (test_preprocess), while a one-voxel shift or a flipped
    # axis would lose far more.
    fg = [c for c in np.unique(label) if c]
    dice = [2 * np.sum((pred == c) & (label == c)) / (np.sum(pred == c) + np.sum(label == c)) for c in fg]
    assert np.mean(dice) >= 0.9 and min(dice) >= 0.85, dice


def test_predict_needs_a_finetuned_checkpoint(small_demo, backbone, tmp_path, capsys):
    scan = sorted((Path(small_demo) / "raw" / "imagesTr").iterdir())[0]
    assert predict.main(predict.parse_args(["-i", str(scan), "-o", str(tmp_path / "o"), "--model", str(backbone)])) == 2
    assert "not a fine-tuned model" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", ["finetune.py", "experiments/neighbours/medcontext.py"])
def test_finetune_under_torchrun_two_processes(small_demo, backbone, tmp_path, script):
    """DDP fine-tuning on CPU (gloo): freeze -> unfreeze re-wraps DDP; rank 0 alone evaluates and
    writes; the saved model loads in a single process. With MedContext: its two-input forward
    and teacher under DDP."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / script), "--data", str(small_demo), "--checkpoint", str(backbone), "--out", str(tmp_path),
           *TINY, "--batch-size", "2", "--steps", "4", "--freeze-steps", "2", "--ramp-steps", "1", "--device", "cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("fold 0:") == 1          # one evaluation, by rank 0
    assert json.loads((tmp_path / "results.json").read_text())["mean_dice"] >= 0
    model, _ = finetune.load_model(tmp_path / "model_fold0.pt")
    assert model.config["head"] == "nonlinear"


@pytest.mark.parametrize("problem", ["output_is_the_scan", "output_is_a_file"])
def test_predict_checks_its_output_before_any_work(small_demo, tmp_path, problem, monkeypatch, capsys):
    scan = sorted((Path(small_demo) / "raw" / "imagesTr").iterdir())[0]
    copy = tmp_path / "in" / scan.name
    copy.parent.mkdir()
    shutil.copy(scan, copy)
    (tmp_path / "taken.txt").write_text("mine")
    before = copy.read_bytes()
    output = {"output_is_the_scan": copy, "output_is_a_file": tmp_path / "taken.txt"}[problem]
    monkeypatch.setattr(predict, "load_model", lambda *a: pytest.fail("work started before the output was checked"))
    assert predict.main(predict.parse_args(["-i", str(copy), "-o", str(output), "--model", str(tmp_path)])) == 2
    err = capsys.readouterr().err.strip()
    assert str(output) in err and "\n" not in err
    assert copy.read_bytes() == before and (tmp_path / "taken.txt").read_text() == "mine"
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize("budget", ["0", "-1", "99"])
def test_train_cases_outside_the_fold_is_refused(small_demo, tmp_path, budget, capsys):
    """0 or less is refused where it is parsed (argparse, exit 2); too many once the folds are known."""
    with pytest.raises(SystemExit) as e:
        finetune.main(finetune.parse_args(["--data", str(small_demo), "--init", "random", "--out", str(tmp_path),
                                           *TINY, "--train-cases", budget]))
    message = str(e.value.code) + capsys.readouterr().err
    expected = "argument --train-cases: must be >= 1" if int(budget) < 1 else f"--train-cases {budget}: must be between 1 and"
    assert expected in message
    assert not (tmp_path / "results.json").exists()


def test_cuda_on_a_cpu_build_is_one_line(small_demo, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="--device cuda: this torch build sees no CUDA GPU"):
        finetune.main(finetune.parse_args(["--data", str(small_demo), "--init", "random", "--out", str(tmp_path),
                                           *TINY, "--device", "cuda"]))


def test_truncated_preprocessed_case_is_one_line(small_demo, tmp_path):
    import data
    copy = tmp_path / "d"
    shutil.copytree(small_demo, copy, ignore=shutil.ignore_patterns("raw"))
    case = data.list_cases(copy)[0]
    image = copy / "cases" / case / "image.npy"
    image.write_bytes(image.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{case}: unreadable case .*re-run preprocess.py"):
        data.load_case(copy, case)


def test_reestimated_batchnorm_statistics_are_the_plain_average(small_demo):
    """After reestimate_batchnorm, a BatchNorm's running mean is the mean of its inputs over the
    re-estimation batches (momentum None: cumulative), whatever it was before."""
    model = SegmentationModel(dict(in_channels=1, base_channels=2, num_levels=2), 9, head="nonlinear")
    bn = model.backbone.encoder[0][0].body[0]
    bn.running_mean.fill_(100.0)
    seen = []
    bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().mean((0, 2, 3, 4))))
    cfg = dict(patch_size=(16, 16, 8), batch_size=2, bn_batches=5)
    ids = data.list_cases(small_demo, labelled=True)
    finetune.reestimate_batchnorm(model, small_demo, ids, cfg, torch.device("cpu"), seed=0)
    assert len(seen) == 5                   # --bn-batches 5: five batches, no more
    torch.testing.assert_close(bn.running_mean, torch.stack(seen).mean(0), rtol=1e-4, atol=1e-6)
    assert bn.momentum == 0.1


def test_eval_every_records_a_curve_without_changing_the_run(small_demo, tmp_path):
    """--eval-every 2: results.json holds the test Dice at steps 2 and 4 (on a copy with
    re-estimated BatchNorm), and the trained model is the one a run without it gives."""
    base = ["--data", str(small_demo), "--init", "random", *TINY, "--steps", "4"]
    plain = finetune.main(finetune.parse_args([*base, "--out", str(tmp_path / "plain")]))
    curved = finetune.main(finetune.parse_args([*base, "--out", str(tmp_path / "curve"), "--eval-every", "2"]))
    steps = [s for s, _ in curved["curve"]["0"]]
    assert steps == [2, 4] and all(0 <= d <= 1 for _, d in curved["curve"]["0"])
    assert "curve" not in plain and curved["folds"] == plain["folds"]
    a = torch.load(tmp_path / "plain" / "model_fold0.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "curve" / "model_fold0.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert curved["curve"]["0"][-1][1] == pytest.approx(curved["folds"]["0"])   # the last point is the final model


def test_fixed_split_and_draws(small_demo, tmp_path):
    """preprocess.py --demo writes split.json (disjoint train / val / test); --split trains on the
    pool and scores the test (or --evaluate-on val) cases; --draw k picks another subset of the
    pool; a split that names other cases is refused with one line."""
    split = json.loads((Path(small_demo) / "split.json").read_text())
    ids = data.list_cases(small_demo, labelled=True)
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(ids)
    assert split["train"] and split["val"] and split["test"]
    base = ["--data", str(small_demo), "--init", "random", "--split", str(Path(small_demo) / "split.json")]
    args = finetune.parse_args([*base, "--out", str(tmp_path / "a")])
    assert downstream.plan_folds(args, small_demo, None) == [(0, split["train"], split["test"])]
    args = finetune.parse_args([*base, "--out", str(tmp_path / "a"), "--evaluate-on", "val", "--train-cases", "1"])
    (_, train, scored), = downstream.plan_folds(args, small_demo, None)
    assert scored == split["val"] and len(train) == 1 and train[0] in split["train"]
    draws = {tuple(downstream.plan_folds(finetune.parse_args([*base, "--out", "o", "--train-cases", "1", "--draw", str(k)]),
                                         small_demo, None)[0][1]) for k in range(6)}
    assert len(draws) == len(split["train"])                  # 6 draws of 1 case reach every pool case (2 here)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(train=["nope"], val=[], test=split["test"])))
    with pytest.raises(ValueError, match="bad.json: train / val / test must be disjoint"):
        downstream.plan_folds(finetune.parse_args([*base[:-1], str(bad), "--out", "o"]), small_demo, None)


def test_paired_arms_receive_identical_inputs(small_demo, backbone, tmp_path):
    """evidence.py's two arms (--checkpoint vs --init random, same --split, --train-cases,
    --draw and --seed) train on the same cases, the same batches in the same order, the same
    augmentation stream and the same head initialisation; only the backbone weights differ."""
    split = str(Path(small_demo) / "split.json")
    common = ["--data", str(small_demo), "--split", split, "--train-cases", "1", "--draw", "1", "--seed", "1",
              *TINY, "--aug", "nnunet-like"]
    arms = {"pretrained": finetune.parse_args([*common, "--checkpoint", str(backbone), "--out", str(tmp_path / "p")]),
            "scratch": finetune.parse_args([*common, "--init", "random", "--out", str(tmp_path / "s")])}
    seen = {}
    for name, args in arms.items():
        (fold, train, test), = downstream.plan_folds(args, small_demo, None)
        model, _ = downstream.new_segmenter(args, 10, "nonlinear", torch.device("cpu"), fold)
        cfg = {k: getattr(args, k) for k in finetune.CONFIG}
        batches = list(finetune.make_loader(small_demo, train, cfg, args.seed, 0, torch.device("cpu")))
        g = torch.Generator().manual_seed(args.seed * 7919 + 29)
        augmented = [augment.supervised_augment(b["image"], b["label"], g, "nnunet-like") for b in batches]
        seen[name] = dict(cases=(train, test), head={k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")},
                          backbone=model.backbone.state_dict(), batches=augmented)
    p, s = seen["pretrained"], seen["scratch"]
    assert p["cases"] == s["cases"]
    assert p["head"].keys() == s["head"].keys() and all(torch.equal(p["head"][k], s["head"][k]) for k in p["head"])
    assert len(p["batches"]) == len(s["batches"]) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(p["batches"], s["batches"]))
    assert any(not torch.equal(p["backbone"][k], s["backbone"][k]) for k in p["backbone"] if k.endswith("weight"))
