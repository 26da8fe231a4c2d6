"""linear_probe.py: the head trains on cached pyramids and only the head trains; the cached
head equals the frozen model; sampled-voxel logits equal the full-volume logits; the sample is
class-balanced; random init; a bad checkpoint or a finished result is one line."""

import json
import shutil

import numpy as np
import pytest
import torch

import downstream
import linear_probe
from model import FPN3d, SegmentationModel
from data import InputError

PROBE = ["--eval-patch-size", "64", "64", "32", "--folds", "2", "--fold", "0", "--preset", "demo"]


def test_linear_probe_trains_only_the_head(small_demo, backbone, tmp_path, monkeypatch):
    """The probe trains the head on cached pyramids: the backbone is never called inside the
    training loop, and its weights and BatchNorm buffers are unchanged afterwards."""
    seen, models = {}, []
    real, real_new = linear_probe.train_head, downstream.new_segmenter

    def spy(head, cache, labels, train_ids, cfg, device, *a, **k):
        model = next(m for m in models if m.head is head)
        assert not any(p.requires_grad for p in model.backbone.parameters())
        assert all(not m.training for m in model.backbone.modules())  # eval mode: BN frozen
        seen["before"] = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        seen["head"] = {k: v.clone() for k, v in head.state_dict().items()}
        with monkeypatch.context() as m:  # any backbone call in the loop fails the test
            m.setattr(
                FPN3d, "forward", lambda *a: pytest.fail("backbone called while training the head")
            )
            out = real(head, cache, labels, train_ids, cfg, device, *a, **k)
        seen["after"], seen["head_after"] = model.backbone.state_dict(), head.state_dict()
        return out

    def new(*a, **k):
        model, info = real_new(*a, **k)
        models.append(model)
        return model, info

    monkeypatch.setattr(linear_probe, "train_head", spy)
    monkeypatch.setattr(linear_probe, "new_segmenter", new)
    results = linear_probe.main(
        linear_probe.parse_args(
            [
                "--data",
                str(small_demo),
                "--checkpoint",
                str(backbone),
                "--out",
                str(tmp_path),
                *PROBE,
                "--max-steps",
                "5",
            ]
        )
    )
    for k, v in seen["before"].items():  # weights and BN running statistics untouched
        assert torch.equal(v, seen["after"][k]), k
    assert any(not torch.equal(v, seen["head_after"][k]) for k, v in seen["head"].items())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {
        "mean_dice",
        "std_dice",
        "per_class",
        "folds",
        "args",
        "checkpoint",
        "head_training",
    } <= set(saved)
    assert saved["checkpoint"] == str(backbone) and 0.0 <= saved["mean_dice"] <= 1.0
    assert saved["head_training"]["0"]["steps"] == 5
    assert saved == json.loads(json.dumps(results))


def test_head_on_cached_features_equals_the_frozen_model():
    """head(cached pyramid) == the frozen model run on the same volume (odd sizes, eval mode),
    the standardisation included; the cache is float16, hence the tolerance."""
    torch.manual_seed(0)
    model = SegmentationModel(
        dict(in_channels=1, base_channels=4, num_levels=3), 5, head="linear"
    ).eval()
    for m in model.backbone.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    image = np.random.default_rng(0).random((1, 21, 18, 11), dtype=np.float32)
    levels = linear_probe.compute_pyramid(model.backbone, image, (64, 64, 32), torch.device("cpu"))
    assert [a.shape[1:] for a in levels] == [(21, 18, 11), (11, 9, 6), (6, 5, 3)] and levels[
        0
    ].dtype == np.float16
    means, stds = linear_probe.channel_statistics({"a": levels}, ["a"])
    for l, a in enumerate(levels):  # statistics against numpy
        flat = a.astype(np.float64).reshape(a.shape[0], -1)
        np.testing.assert_allclose(means[l].numpy(), flat.mean(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stds[l].numpy(), flat.std(1), rtol=1e-4, atol=1e-6)
    model.head.set_statistics(means, stds)
    with torch.no_grad():
        direct = model(torch.from_numpy(image)[None])
        cached = model.head(linear_probe.as_tensors(levels, torch.device("cpu")))
    torch.testing.assert_close(cached, direct, atol=2e-2, rtol=1e-2)
    # a volume larger than the window: tiled, every level on its own grid
    tiled = linear_probe.compute_pyramid(model.backbone, image, (8, 8, 8), torch.device("cpu"))
    assert [a.shape for a in tiled] == [a.shape for a in levels]


def test_sampled_voxel_logits_equal_the_full_volume_logits():
    """The head trained on gathered voxels is the head evaluated as a convolution: at every sampled
    voxel of an odd-sized volume, forward_voxels(gathered levels) == head(pyramid) there."""
    torch.manual_seed(0)
    model = SegmentationModel(
        dict(in_channels=1, base_channels=4, num_levels=3), 5, head="linear"
    ).eval()
    image = np.random.default_rng(1).random((1, 21, 18, 11), dtype=np.float32)
    levels = linear_probe.compute_pyramid(model.backbone, image, (64, 64, 32), torch.device("cpu"))
    model.head.set_statistics(*linear_probe.channel_statistics({"a": levels}, ["a"]))
    with torch.no_grad():
        for conv in model.head.convs:  # weights that are not small
            conv.weight.normal_()
        model.head.convs[0].bias.normal_()
        label = np.random.default_rng(2).integers(0, 5, (21, 18, 11))
        coords, y, counts = linear_probe.balanced_voxel_sample(
            label, 5, 40, np.random.default_rng(3)
        )
        assert all((coords.max(0) < (21, 18, 11)).tolist()) and np.array_equal(
            label[tuple(coords.T)], y
        )
        voxels = model.head.forward_voxels(linear_probe.gather_levels(levels, coords))  # (n, 5)
        full = model.head(linear_probe.as_tensors(levels, torch.device("cpu")))[0]  # (5, X, Y, Z)
    torch.testing.assert_close(
        voxels, full[:, coords[:, 0], coords[:, 1], coords[:, 2]].T, atol=1e-4, rtol=1e-5
    )


def test_voxel_sample_is_class_balanced():
    label = np.zeros((30, 20, 10), np.int64)
    label[:5, :4, :2] = 3  # 40 voxels
    label[10:20] = 1  # 2000 voxels
    coords, y, counts = linear_probe.balanced_voxel_sample(label, 5, 100, np.random.default_rng(0))
    assert np.bincount(y, minlength=5).tolist() == [100, 100, 0, 40, 0]  # min(count, per class)
    assert counts.tolist() == np.bincount(label.ravel(), minlength=5).tolist()
    assert len(np.unique(coords, axis=0)) == len(coords)  # without replacement
    assert np.array_equal(label[tuple(coords.T)], y)


def test_linear_probe_random_init_and_no_overwrite(small_demo, tmp_path):
    r = linear_probe.main(
        linear_probe.parse_args(
            [
                "--data",
                str(small_demo),
                "--init",
                "random",
                "--out",
                str(tmp_path),
                *PROBE,
                "--max-steps",
                "3",
            ]
        )
    )
    assert r["init"] == "random" and r["checkpoint"] is None
    before = (tmp_path / "results.json").read_bytes()
    with pytest.raises(InputError, match="holds a finished run \\(results.json\\)"):
        linear_probe.main(
            linear_probe.parse_args(
                [
                    "--data",
                    str(small_demo),
                    "--init",
                    "random",
                    "--out",
                    str(tmp_path),
                    *PROBE,
                    "--max-steps",
                    "3",
                    "--seed",
                    "3",
                ]
            )
        )
    assert (tmp_path / "results.json").read_bytes() == before


@pytest.mark.parametrize(
    "problem, words",
    [
        ("missing", "does not exist"),
        ("not_a_backbone", "a resumable checkpoint.pt"),
        ("wrong_architecture", r"key\(s\) missing"),
    ],
)
def test_bad_checkpoint_is_a_clear_error(small_demo, backbone, tmp_path, problem, words):
    path = tmp_path / "ckpt.pt"
    if problem == "not_a_backbone":
        shutil.copy(
            backbone.with_name("checkpoint.pt"), path
        )  # the resumable file, not the backbone
    elif problem == "wrong_architecture":
        ckpt = torch.load(backbone, weights_only=True)
        ckpt["backbone_config"]["num_levels"] += 1
        torch.save(ckpt, path)
    with pytest.raises(InputError, match=words) as e:
        linear_probe.main(
            linear_probe.parse_args(
                [
                    "--data",
                    str(small_demo),
                    "--checkpoint",
                    str(path),
                    "--out",
                    str(tmp_path / "o"),
                    *PROBE,
                ]
            )
        )
    assert str(path) in str(e.value) and not (tmp_path / "o").exists()
