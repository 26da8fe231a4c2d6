"""Tests for model.py: each piece against a reference (naive loops, F.conv3d,
the reference parameter count). Tiny configs; runs in seconds on CPU.

    python -m pytest -q tests/test_model.py
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import (
    ARCHS,
    FPN3d,
    LinearHead,
    NonLinearHead,
    PretrainModel,
    ResBlock3d,  # noqa: E402
    SegmentationModel,
    sample_voxels,
)

TINY = dict(in_channels=1, base_channels=4, num_levels=3)
TINY_PATCH = (16, 16, 8)  # (X, Y, Z)


def random_pyramid(batch, shape, channels, generator, dtype=torch.float32):
    """Level l: (B, C_l, X/2**l, Y/2**l, Z/2**l) of random numbers."""
    return [
        torch.randn(batch, c, *(s // 2**l for s in shape), generator=generator, dtype=dtype)
        for l, c in enumerate(channels)
    ]


def random_coords(n, batch, shape, generator):
    """(N, 4) = (b, x, y, z), including the corners of the volume."""
    cols = [torch.randint(0, m, (n,), generator=generator) for m in (batch, *shape)]
    coords = torch.stack(cols, dim=1)
    corners = torch.tensor([[0, 0, 0, 0], [batch - 1, shape[0] - 1, shape[1] - 1, shape[2] - 1]])
    return torch.cat([coords, corners])


# ----------------------------------------------------------------------------- voxel sampling


@pytest.mark.parametrize("channels_last", [False, True])
def test_sample_voxels_matches_naive_loop(channels_last):
    g = torch.Generator().manual_seed(0)
    shape, channels, batch = (8, 16, 24), [3, 5, 7, 2], 3
    pyramid = random_pyramid(batch, shape, channels, g)
    if channels_last:
        pyramid = [p.contiguous(memory_format=torch.channels_last_3d) for p in pyramid]
    coords = random_coords(60, batch, shape, g)
    sampled = sample_voxels(pyramid, coords)
    for l, level in enumerate(pyramid):
        assert sampled[l].shape == (len(coords), channels[l])
        for k, (b, x, y, z) in enumerate(coords.tolist()):
            f = 2**l
            torch.testing.assert_close(
                sampled[l][k], level[b, :, x // f, y // f, z // f], rtol=0, atol=0
            )


def test_sampling_geometry_matches_max_pool_and_nearest_upsampling():
    """Level l read at x>>l is the coarse cell containing x: a max-pooled value there is >= the
    voxel's own value, and nearest upsampling by 2**l reads the same value back at x."""
    g = torch.Generator().manual_seed(1)
    volume = torch.randn(2, 1, 16, 8, 8, generator=g)
    pyramid = [volume]
    for _ in range(3):
        pyramid.append(F.max_pool3d(pyramid[-1], 2))
    coords = random_coords(80, 2, (16, 8, 8), g)
    sampled = sample_voxels(pyramid, coords)
    for l in range(1, 4):
        assert (sampled[l] >= sampled[0]).all()
        up = F.interpolate(pyramid[l], scale_factor=2**l, mode="nearest")
        b, x, y, z = coords.unbind(1)
        torch.testing.assert_close(sampled[l], up[b, :, x, y, z], rtol=0, atol=0)


def test_projection_after_sampling_equals_conv_before():
    g = torch.Generator().manual_seed(2)
    shape, channels = (8, 8, 16), [4, 8, 16]
    pyramid = random_pyramid(2, shape, channels, g, dtype=torch.float64)
    coords = random_coords(40, 2, shape, g)
    model = PretrainModel(
        dict(base_channels=4, num_levels=3), arch="balanced", projection_dim=6
    ).double()
    # the 1x1x1 conv over whole levels first, then sampling: level l (B, 6, X/2**l, Y/2**l, Z/2**l)
    convs = [
        F.conv3d(level, proj.weight[:, :, None, None, None], proj.bias)
        for proj, level in zip(model.projections, pyramid)
    ]
    expected = sample_voxels(convs, coords)  # list of (N, 6)
    got = [proj(s) for proj, s in zip(model.projections, sample_voxels(pyramid, coords))]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(
        model.voxel_features(pyramid, coords), torch.cat(expected, dim=1)
    )  # (N, 3 * 6)


def test_sample_voxels_rejects_bad_coords():
    with pytest.raises(ValueError, match="coords"):
        sample_voxels([torch.zeros(1, 2, 4, 4, 4)], torch.zeros(5, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- backbone


def test_resblock_skip_paths():
    """With the body's last conv zeroed a block is its skip: identity, or the 1x1x1 conv."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 4, 4, generator=g)
    for c_out in (3, 5):
        block = ResBlock3d(3, c_out).eval()
        with torch.no_grad():
            block.body[-1].weight.zero_()
            block.body[-1].bias.zero_()
        expected = x if c_out == 3 else F.conv3d(x, block.skip.weight, block.skip.bias)
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("preset", sorted(ARCHS))
def test_fpn_shapes_for_both_presets(preset):
    levels = ARCHS[preset]["num_levels"]
    m = 2 ** (levels - 1)
    shape = (m, 2 * m, m)  # the smallest non-cubic input this depth accepts
    fpn = FPN3d(in_channels=1, base_channels=2, num_levels=levels).to(
        memory_format=torch.channels_last_3d
    )
    x = torch.randn(2, 1, *shape).contiguous(memory_format=torch.channels_last_3d)
    # torch 2.13's single-threaded CPU 1x1x1 conv returns NCDHW (measured: OMP_NUM_THREADS=1), a
    # kernel choice outside this code; check our layers with the multi-threaded kernels.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pyramid = fpn(x)
    finally:
        torch.set_num_threads(threads)
    assert fpn.channels == [2 * 2**l for l in range(levels)]
    assert len(pyramid) == levels
    for l, p in enumerate(pyramid):
        assert p.shape == (2, 2 * 2**l, *(s // 2**l for s in shape))
        assert p.is_contiguous(memory_format=torch.channels_last_3d)  # no NCDHW copies on the way


@pytest.mark.parametrize("preset, expected", [("balanced", 47_567_872), ("vox2vec", 47_624_448)])
def test_parameter_counts_equal_the_reference(preset, expected):
    with torch.device("meta"):
        fpn = FPN3d(**ARCHS[preset])
    # Counted by building the authors' FPN3d(1, 32, 5) and FPN3d(1, 16, 6) (README, "Use the
    # authors' weights").
    assert sum(p.numel() for p in fpn.parameters()) == expected


def test_odd_input_sizes_give_ceil_mode_levels():
    fpn = FPN3d(**TINY)
    pyramid = fpn(torch.zeros(1, 1, 17, 16, 7))
    for l, p in enumerate(pyramid):
        assert p.shape[2:] == tuple(-(-s // 2**l) for s in (17, 16, 7))
    with pytest.raises(ValueError, match="expected input"):
        fpn(torch.zeros(1, 2, 16, 16, 8))


def test_representation_dims():
    with torch.device("meta"):
        balanced = PretrainModel(ARCHS["balanced"], arch="balanced")
        vox2vec = PretrainModel(ARCHS["vox2vec"], arch="vox2vec")
    assert balanced.representation_dim == 5 * 32
    assert vox2vec.representation_dim == sum(16 * 2**l for l in range(6)) == 1008
    assert balanced.projector[0].in_features == 160 and vox2vec.projector[0].in_features == 1008
    # and on real features of a tiny model
    g = torch.Generator().manual_seed(4)
    for arch, dim in (("balanced", 3 * 32), ("vox2vec", 4 + 8 + 16)):
        model = PretrainModel(TINY, arch=arch)
        pyramid = random_pyramid(2, TINY_PATCH, model.backbone.channels, g)
        coords = random_coords(10, 2, TINY_PATCH, g)
        assert model.voxel_features(pyramid, coords).shape == (len(coords), dim)


def test_projections_are_registered_and_trained():
    g = torch.Generator().manual_seed(5)
    model = PretrainModel(TINY, arch="balanced")
    params = {id(p) for p in model.parameters()}
    keys = set(model.state_dict())
    for l, proj in enumerate(model.projections):
        assert id(proj.weight) in params and id(proj.bias) in params
        assert f"projections.{l}.weight" in keys and f"projections.{l}.bias" in keys
    x = torch.rand(2, 1, *TINY_PATCH, generator=g)
    coords = random_coords(30, 2, TINY_PATCH, g)
    z, recon = model(x, coords)
    (z * torch.randn(z.shape, generator=g)).sum().backward()
    for proj in model.projections:
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_pretrain_forward_outputs_and_rebuild():
    g = torch.Generator().manual_seed(6)
    model = PretrainModel(TINY, arch="balanced", embedding_dim=16, hidden_dim=32)
    x = torch.rand(2, 1, *TINY_PATCH, generator=g)
    coords = random_coords(25, 2, TINY_PATCH, g)
    z, recon = model(x, coords)
    assert z.shape == (len(coords), 16) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(len(coords)))
    assert recon.shape == x.shape
    # the checkpoint recipe: rebuild from .config, load the weights, same outputs
    model.eval()
    clone = PretrainModel(**model.config)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    for a, b in zip(model(x, coords), clone(x, coords)):
        torch.testing.assert_close(a, b)


def test_pretrain_forward_under_autocast_channels_last():
    g = torch.Generator().manual_seed(7)
    model = PretrainModel(TINY, arch="vox2vec").to(memory_format=torch.channels_last_3d)
    x = torch.rand(2, 1, *TINY_PATCH, generator=g).contiguous(memory_format=torch.channels_last_3d)
    coords = random_coords(20, 2, TINY_PATCH, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, recon = model(x, coords)
    assert z.dtype == torch.float32 and recon.shape == x.shape
    torch.testing.assert_close(z.norm(dim=1), torch.ones(len(coords)))


# ----------------------------------------------------------------------------- downstream heads


def test_linear_head_is_linear_classifier_on_sampled_levels():
    g = torch.Generator().manual_seed(8)
    channels, shape, k = [4, 8, 16], (8, 8, 16), 3
    head = LinearHead(channels, k).double()
    assert head.convs[0].bias is not None and all(c.bias is None for c in head.convs[1:])
    pyramid = random_pyramid(2, shape, channels, g, dtype=torch.float64)
    logits = head(pyramid)
    assert logits.shape == (2, k, *shape)
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(n) for n in (2, *shape)], indexing="ij"), -1
    ).reshape(-1, 4)
    sampled = sample_voxels(pyramid, grid)  # list of (N, C_l)
    expected = (
        sum(s @ conv.weight.flatten(1).T for s, conv in zip(sampled, head.convs))
        + head.convs[0].bias
    )
    b, x, y, z = grid.unbind(1)
    torch.testing.assert_close(logits.permute(0, 2, 3, 4, 1)[b, x, y, z], expected)


@pytest.mark.parametrize("head", ["linear", "nonlinear"])
def test_segmentation_model_shapes_and_rebuild(head):
    g = torch.Generator().manual_seed(9)
    model = SegmentationModel(TINY, num_classes=5, head=head)
    assert isinstance(model.head, LinearHead if head == "linear" else NonLinearHead)
    x = torch.rand(2, 1, *TINY_PATCH, generator=g)
    assert model(x).shape == (2, 5, *TINY_PATCH)
    model.eval()
    clone = SegmentationModel(**model.config)
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone.eval()(x), model(x))
    with pytest.raises(ValueError, match="head"):
        SegmentationModel(TINY, num_classes=5, head="mlp")


def test_nonlinear_head_shape():
    g = torch.Generator().manual_seed(10)
    head = NonLinearHead([4, 8, 16], num_classes=2, hidden=6)
    assert head(random_pyramid(3, (8, 8, 4), [4, 8, 16], g)).shape == (3, 2, 8, 8, 4)


def test_training_bytes_on_a_hand_worked_case():
    """channels (2, 4) on a 2 x 2 x 2 patch: level 0 holds 2 x 8 values, level 1 4 x 1; 11 float32
    copies of both for 3 patches, and InfoNCE's (2N)^2 logits three times for N = 5 pairs."""
    import model

    assert model.SAVED_PER_LEVEL == 11
    assert model.training_bytes((2, 4), (2, 2, 2), 3) == 4 * 11 * 3 * (2 * 8 + 4 * 1)
    assert model.training_bytes((2, 4), (2, 2, 2), 3, voxel_pairs=5) == 4 * (
        11 * 3 * 20 + 3 * 10**2
    )
    assert model.training_bytes((2, 4), (3, 2, 2), 1) == 4 * 11 * (
        2 * 12 + 4 * 2
    )  # ceil-mode: 3 -> 2 at level 1
