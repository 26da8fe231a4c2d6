"""weights.py: the key map and the file reader, and FPN3d against the authors' layout (a state dict
built here from the layout description alone, their key names and shapes, converted and loaded
strictly, must give the pyramid of a forward pass written here from the same description, on odd
input sizes); every kind of bad file one line; a backbone file decides the FPN in every script;
fine-tuned model files."""

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import weights as convert
from model import ARCHS, FPN3d, SegmentationModel
from data import InputError

ROOT = Path(__file__).resolve().parents[1]


def reference_state_dict(in_channels, base, levels, g):
    """Their FPN3d's state dict, from the layout in weights.py's comment, random values."""
    sd = {}

    def conv(name, c_out, c_in, k):
        sd[f"{name}.weight"] = torch.randn(c_out, c_in, k, k, k, generator=g) / (c_in * k**3) ** 0.5
        sd[f"{name}.bias"] = 0.1 * torch.randn(c_out, generator=g)

    def bn(name, c):
        sd[f"{name}.weight"] = 1 + 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.3 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(7)

    def stage(name, c):
        for j in (0, 1):
            bn(f"{name}.layers.{j}.layers.0", c)
            conv(f"{name}.layers.{j}.layers.2", c, c, 3)
            bn(f"{name}.layers.{j}.layers.3", c)
            conv(f"{name}.layers.{j}.layers.5", c, c, 3)

    conv("first_conv", base, in_channels, 3)
    c = base
    for i in range(levels - 1):
        stage(f"left_blocks.{i}", c)
        conv(f"down_blocks.{i}.1", 2 * c, c, 1)
        k = levels - 2 - i  # decoder index: 0 = coarsest
        conv(f"up_blocks.{k}.0", c, 2 * c, 1)
        conv(f"skip_blocks.{k}", c, c, 1)
        stage(f"right_blocks.{k}", c)
        c *= 2
    stage("bottom_block", c)
    return sd


def reference_forward(sd, x, levels):
    """Their forward pass, written from the description (eval-mode BatchNorm)."""
    conv = lambda h, n, pad: F.conv3d(h, sd[f"{n}.weight"], sd[f"{n}.bias"], padding=pad)
    bn = lambda h, n: F.batch_norm(
        h,
        sd[f"{n}.running_mean"],
        sd[f"{n}.running_var"],
        sd[f"{n}.weight"],
        sd[f"{n}.bias"],
        training=False,
        eps=1e-5,
    )

    def stage(h, name):
        for j in (0, 1):
            p = f"{name}.layers.{j}.layers"
            t = conv(F.relu(bn(h, f"{p}.0")), f"{p}.2", 1)
            h = h + conv(F.relu(bn(t, f"{p}.3")), f"{p}.5", 1)
        return h

    h, skips = conv(x, "first_conv", 1), []
    for i in range(levels - 1):
        h = stage(h, f"left_blocks.{i}")
        skips.append(h)
        h = conv(F.max_pool3d(h, 2, ceil_mode=True), f"down_blocks.{i}.1", 0)
    h = stage(h, "bottom_block")
    pyramid = [h]
    for k in range(levels - 1):
        h = F.interpolate(conv(h, f"up_blocks.{k}.0", 0), scale_factor=2, mode="nearest")
        s = skips.pop()
        h = h[..., : s.shape[2], : s.shape[3], : s.shape[4]] + conv(s, f"skip_blocks.{k}", 0)
        h = stage(h, f"right_blocks.{k}")
        pyramid.insert(0, h)
    return pyramid


@pytest.mark.parametrize("levels, keys", [(6, 340), (5, 278)])
def test_key_counts_match_the_reference(levels, keys):
    sd = reference_state_dict(1, 2, levels, torch.Generator().manual_seed(0))
    assert len(sd) == keys  # issue: 340 (vox2vec), 278 (ours)
    assert set(
        convert.key_map(dict(in_channels=1, base_channels=2, num_levels=levels)).values()
    ) == set(sd)


@pytest.mark.parametrize("shape", [(17, 13, 9), (16, 16, 8), (5, 7, 3)])
def test_converted_reference_weights_give_the_reference_pyramid(shape):
    g = torch.Generator().manual_seed(1)
    levels, config = 4, dict(in_channels=1, base_channels=3, num_levels=4)
    theirs = reference_state_dict(1, 3, levels, g)
    model = FPN3d(**config).eval()
    model.load_state_dict(convert.from_reference(theirs, config), strict=True)
    x = torch.randn(2, 1, *shape, generator=g)
    with torch.no_grad():
        ours, expected = model(x), reference_forward(theirs, x, levels)
    assert len(ours) == len(expected) == levels
    for a, b in zip(ours, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_ours_to_theirs_to_ours_is_the_identity():
    config = dict(in_channels=1, base_channels=2, num_levels=5)
    state = FPN3d(**config).state_dict()
    back = convert.from_reference(convert.to_reference(state, config), config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("wrap", ["raw", "lightning", "lightning_stripped", "ddp", "ours_ddp"])
def test_file_formats_are_detected(tmp_path, wrap, capsys):
    g = torch.Generator().manual_seed(2)
    config = dict(in_channels=1, base_channels=2, num_levels=3)
    theirs = reference_state_dict(1, 2, 3, g)
    head = {"head.weight": torch.zeros(3), "proj.0.bias": torch.zeros(2)}
    obj = {
        "raw": theirs,
        "lightning": {
            "state_dict": {**{f"backbone.{k}": v for k, v in theirs.items()}, **head},
            "epoch": 3,
        },
        "lightning_stripped": {"state_dict": {**theirs, **head}},
        "ddp": {f"module.{k}": v for k, v in theirs.items()},
        "ours_ddp": {f"module.{k}": v for k, v in convert.from_reference(theirs, config).items()},
    }[wrap]
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    got_config, state, info = convert.read_backbone(path)
    assert got_config == config
    model = FPN3d(**got_config)
    model.load_state_dict(state, strict=True)
    assert torch.equal(state["stem.weight"], theirs["first_conv.weight"])
    if wrap.startswith("lightning"):
        assert info["ignored"] == sorted(head)
    printed = capsys.readouterr().out
    assert str(path) in printed and "FPN3d(1, 2, 3)" in printed


def test_bad_files_give_one_line(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(reference_state_dict(1, 2, 3, torch.Generator().manual_seed(3)), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.layer1.weight": torch.zeros(2)}, foreign)
    partial = tmp_path / "partial.pt"
    sd = torch.load(good, weights_only=True)
    sd.pop("skip_blocks.0.weight")
    torch.save(sd, partial)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps({"state_dict": Evil()}))
    for path, message in (
        (truncated, "could not be read safely"),
        (foreign, "no FPN3d found"),
        (partial, "skip_blocks.0.weight"),
        (crafted, "could not be read safely"),
        (tmp_path / "absent.pt", "does not exist"),
    ):
        with pytest.raises(InputError, match=message) as e:
            convert.read_backbone(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_old_backbone_version_is_a_clear_error(tmp_path):
    path = tmp_path / "backbone.pt"
    torch.save(dict(kind="backbone", version=1, backbone_config={}, state_dict={}), path)
    with pytest.raises(InputError, match="version 1.*re-run pretrain.py"):
        convert.read_backbone(path)


@pytest.mark.parametrize("preset, params", [("balanced", 47_567_872), ("vox2vec", 47_624_448)])
def test_reference_sized_state_dicts_have_the_reference_parameter_count(preset, params):
    with torch.device("meta"):
        state = FPN3d(**ARCHS[preset]).state_dict()
    theirs = convert.to_reference(state, dict(in_channels=1, **ARCHS[preset]))
    n = sum(
        v.numel()
        for k, v in theirs.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert n == params


def test_a_backbone_file_decides_the_network_in_every_script(small_demo, tmp_path):
    """--base-channels contradicting the backbone file gets the same answer from the probe,
    fine-tuning and pretraining's --init-from; --arch with a backbone file is refused."""
    import finetune
    import linear_probe
    import pretrain

    tiny = [
        "--base-channels",
        "4",
        "--num-levels",
        "3",
        "--patch-size",
        "16",
        "16",
        "8",
        "--batch-pairs",
        "2",
        "--num-voxels",
        "32",
        "--workers",
        "0",
    ]
    out = tmp_path / "run"
    pretrain.main(
        pretrain.parse_args(["--data", str(small_demo), "--out", str(out), *tiny, "--steps", "1"])
    )
    backbone = str(out / "backbone.pt")
    for module in (linear_probe, finetune):
        with pytest.raises(InputError, match=f"--base-channels 8 contradicts {backbone} \\(4\\)"):
            module.main(
                module.parse_args(
                    [
                        "--data",
                        str(small_demo),
                        "--checkpoint",
                        backbone,
                        "--out",
                        str(tmp_path / module.__name__),
                        "--base-channels",
                        "8",
                    ]
                )
            )
        with pytest.raises(
            InputError, match=f"--arch applies to --init random; {backbone} decides"
        ):
            module.main(
                module.parse_args(
                    [
                        "--data",
                        str(small_demo),
                        "--checkpoint",
                        backbone,
                        "--out",
                        str(tmp_path / module.__name__),
                        "--arch",
                        "vox2vec",
                    ]
                )
            )
    with pytest.raises(InputError, match=f"--base-channels 8 contradicts {backbone} \\(4\\)"):
        pretrain.main(
            pretrain.parse_args(
                [
                    "--data",
                    str(small_demo),
                    "--out",
                    str(tmp_path / "again"),
                    *tiny,
                    "--base-channels",
                    "8",
                    "--init-from",
                    backbone,
                ]
            )
        )
    assert not (tmp_path / "again").exists() and not (tmp_path / "finetune").exists()


def test_segmenter_files_round_trip_and_are_named(tmp_path):
    torch.manual_seed(0)
    model = SegmentationModel(
        dict(in_channels=1, base_channels=2, num_levels=2), 3, head="nonlinear"
    )
    convert.save_segmenter(
        tmp_path / "model_fold0.pt", model, labels={"0": "bg", "1": "a", "2": "b"}, fold=0
    )
    loaded, record = convert.load_segmenter(tmp_path / "model_fold0.pt")
    assert not loaded.training and record["labels"]["1"] == "a" and record["fold"] == 0
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values())
    )
    torch.save(dict(kind="backbone", version=convert.FORMAT_VERSION), tmp_path / "backbone.pt")
    with pytest.raises(
        InputError, match="is a pretrained backbone \\(pretrain.py\\), not a fine-tuned model"
    ):
        convert.load_segmenter(tmp_path / "backbone.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps({"kind": "segmenter", "x": Evil()}))
    with pytest.raises(InputError) as e:
        convert.load_segmenter(crafted)
    assert "code could run" in str(e.value) and "weights_only=False" not in str(e.value)


@pytest.mark.parametrize(
    "make, words",
    [
        ("nifti", "a NIfTI image"),
        ("empty", "an empty file"),
        ("text", "a text file"),
        ("folder", "a folder"),
    ],
)
def test_a_file_is_named_for_what_it_is(tmp_path, make, words):
    import nibabel as nib
    import numpy as np

    path = (
        tmp_path
        / {"nifti": "scan.nii.gz", "empty": "empty.pt", "text": "notes.txt", "folder": "somewhere"}[
            make
        ]
    )
    if make == "nifti":
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(path))
    elif make == "empty":
        path.write_bytes(b"")
    elif make == "text":
        path.write_text("lr = 3e-4\n")
    else:
        path.mkdir()
    with pytest.raises(InputError, match=words) as e:
        convert.read_backbone(path)
    assert (
        str(path) in str(e.value)
        and "weights_only=False" not in str(e.value)
        and "\n" not in str(e.value)
    )


@pytest.mark.parametrize("channels", [2, 3])
def test_a_single_channel_backbone_starts_c_channels(channels):
    """expand_stem: the first convolution repeated over C inputs and divided by C, so C copies of
    one image give the single-channel network's pyramid (to float rounding); another channel count
    of backbone is refused."""
    torch.manual_seed(0)
    single = FPN3d(in_channels=1, base_channels=4, num_levels=3).eval()
    multi = FPN3d(in_channels=channels, base_channels=4, num_levels=3).eval()
    multi.load_state_dict(convert.expand_stem(single.state_dict(), channels, "backbone.pt"))
    x = torch.randn(2, 1, 13, 12, 7)
    with torch.no_grad():
        for a, b in zip(single(x), multi(x.repeat(1, channels, 1, 1, 1))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(
        convert.expand_stem(single.state_dict(), 1, "b")["stem.weight"],
        single.state_dict()["stem.weight"],
    )
    with pytest.raises(
        InputError, match="backbone.pt: a 2-channel backbone cannot start a 3-channel network"
    ):
        convert.expand_stem(
            FPN3d(in_channels=2, base_channels=4, num_levels=3).state_dict(), 3, "backbone.pt"
        )
