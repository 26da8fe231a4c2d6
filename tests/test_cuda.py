"""The CUDA path, where CUDA exists (skipped otherwise): the FPN, voxel sampling and the losses
agree between CPU and GPU in float32; the augmentations have the same statistics on both; one
bf16 training step of pretrain.py's and finetune.py's loops is finite and makes no host
synchronisation (torch.cuda.set_sync_debug_mode("error")); the paper step's peak memory is
printed. linear_probe.py is left out of the sync check: its L-BFGS line search reads the loss
on the host by design (a few hundred reads per fold, none per voxel)."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip(
        "no CUDA device: the CUDA path is checked on a GPU machine (../shared/gpu_check.sh)",
        allow_module_level=True,
    )

import augment  # noqa: E402
from finetune import make_optimizer  # noqa: E402
from loss import info_nce, reconstruction_loss, segmentation_loss  # noqa: E402
from model import FPN3d, PretrainModel, SegmentationModel, sample_voxels  # noqa: E402
import pretrain  # noqa: E402
from pretrain import training_step  # noqa: E402

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
FP32 = dict(atol=1e-4, rtol=1e-4)  # fp32 on both sides, TF32 off: only summation order differs


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_fpn_forward_agrees_with_cpu():
    torch.manual_seed(0)
    fpn = FPN3d(in_channels=1, base_channels=8, num_levels=4).eval()
    for m in fpn.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 1, 33, 30, 17)  # odd sizes: ceil-mode pooling + crops
    with torch.no_grad():
        cpu = fpn(x)
        gpu = fpn.to(CUDA)(x.to(CUDA))
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, **FP32)


def test_voxel_sampling_and_losses_agree_with_cpu():
    torch.manual_seed(1)
    pyramid = [torch.randn(2, 4 * 2**l, 16 >> l, 16 >> l, 8 >> l) for l in range(3)]
    coords = torch.stack(
        [
            torch.randint(0, 2, (50,)),
            torch.randint(0, 16, (50,)),
            torch.randint(0, 16, (50,)),
            torch.randint(0, 8, (50,)),
        ],
        1,
    )
    for a, b in zip(
        sample_voxels(pyramid, coords),
        sample_voxels([p.to(CUDA) for p in pyramid], coords.to(CUDA)),
    ):
        assert torch.equal(b.cpu(), a)  # a gather: exact
    za, zb = (torch.nn.functional.normalize(torch.randn(64, 32), dim=1) for _ in range(2))
    torch.testing.assert_close(info_nce(za.to(CUDA), zb.to(CUDA)).cpu(), info_nce(za, zb), **FP32)
    r, t = torch.rand(2, 1, 8, 8, 4), torch.rand(2, 1, 8, 8, 4)
    torch.testing.assert_close(
        reconstruction_loss(r.to(CUDA), t.to(CUDA), r.to(CUDA), t.to(CUDA)).cpu(),
        reconstruction_loss(r, t, r, t),
        **FP32,
    )
    logits, label = torch.randn(2, 5, 8, 8, 4), torch.randint(0, 5, (2, 8, 8, 4))
    torch.testing.assert_close(
        segmentation_loss(logits.to(CUDA), label.to(CUDA)).cpu(),
        segmentation_loss(logits, label),
        **FP32,
    )


def changed_fraction(fn, device, n=400):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(n, 1, 20, 20, 8, generator=g, device=device)
    return (fn(x, g) != x).flatten(1).any(1).float().mean().item(), fn(x, g).mean().item()


@pytest.mark.parametrize(
    "name, fn",
    [
        ("shuffle", lambda x, g: augment.local_pixel_shuffle(x, g)),
        ("bezier", lambda x, g: augment.bezier_intensity(x, g)),
        ("inpaint", lambda x, g: augment.local_inpaint(x, g)),
        ("local pipeline", lambda x, g: augment.augment_batch(x, g, "local")),
        ("vox2vec pipeline", lambda x, g: augment.augment_batch(x, g, "vox2vec")),
        (
            "supervised",
            lambda x, g: augment.supervised_augment(
                x, torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long, device=x.device), g
            )[0],
        ),
    ],
)
def test_augmentations_have_the_same_statistics_on_cuda(name, fn):
    """Different random streams, same distribution: the share of patches changed and the mean
    output agree within sampling error (400 patches)."""
    cpu_changed, cpu_mean = changed_fraction(fn, CPU)
    gpu_changed, gpu_mean = changed_fraction(fn, CUDA)
    assert abs(cpu_changed - gpu_changed) < 0.1, (cpu_changed, gpu_changed)
    assert abs(cpu_mean - gpu_mean) < 0.02, (cpu_mean, gpu_mean)


def pretrain_batch(cfg, pairs, voxels):
    X, Y, Z = cfg["patch_size"]
    coords = torch.stack(
        [
            torch.arange(pairs).repeat_interleave(voxels),
            torch.randint(0, X, (pairs * voxels,)),
            torch.randint(0, Y, (pairs * voxels,)),
            torch.randint(0, Z, (pairs * voxels,)),
        ],
        1,
    )
    return dict(
        patches_a=torch.rand(pairs, 1, X, Y, Z).pin_memory(),
        patches_b=torch.rand(pairs, 1, X, Y, Z).pin_memory(),
        coords_a=coords.pin_memory(),
        coords_b=coords.clone().pin_memory(),
    )


def pretrain_step(model, optimizer, batch, cfg, generator):
    loss, parts = training_step(model, batch, cfg, generator, CUDA, torch.bfloat16)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_pretrain_step_bf16_finite_without_host_sync(preset):
    cfg = pretrain.resolve_config(
        pretrain.parse_args(["--data", "unused", "--preset", preset])
    )  # the real presets
    model = PretrainModel(
        dict(in_channels=1, base_channels=cfg["base_channels"], num_levels=cfg["num_levels"])
    )
    model = model.to(CUDA, memory_format=torch.channels_last_3d).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=True)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    batch = pretrain_batch(cfg, cfg["batch_pairs"], cfg["num_voxels"])
    pretrain_step(model, optimizer, batch, cfg, generator)  # warm-up: cuDNN autotuning, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = pretrain_step(model, optimizer, batch, cfg, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    print(
        f"\n{preset} pretraining step: peak memory "
        f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    )


def test_finetune_step_bf16_finite_without_host_sync():
    """finetune.py's step: supervised augmentation, bf16 forward, segmentation loss, Adam."""
    model = SegmentationModel(
        dict(in_channels=1, base_channels=16, num_levels=4), 9, head="nonlinear"
    )
    model = model.to(CUDA, memory_format=torch.channels_last_3d).train()
    optimizer = make_optimizer(model, 2e-3)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.rand(2, 1, 32, 32, 16, device=CUDA)
    y = torch.randint(0, 9, (2, 32, 32, 16), device=CUDA)

    def step():
        xa, ya = augment.supervised_augment(x, y, generator)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(xa.contiguous(memory_format=torch.channels_last_3d))
        loss = segmentation_loss(logits.float(), ya)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
