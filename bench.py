"""Where the time of a pretraining step goes, measured: one table, ratios taken in the same run.

    python bench.py                                   # data path at the paper's config on this CPU
    python bench.py --config demo --device cpu        # whole demo step on CPU
    python bench.py --config paper --device cuda      # whole paper step on a GPU (TFLOP/s, % of bf16 peak)
    python bench.py --probe runs/evidence/pretrain-balanced/backbone.pt   # linear probe: cached vs patch loop
    python bench.py --finetune --config demo --steps 20   # fine-tuning step, --aug none vs nnunet-like

Rows: the data path for one batch (crops + correspondences on the DataLoader side, the
augmentations on the training device), the model forward + backward, the loss, the optimizer,
the total step, peak memory and patch pairs per second; on CUDA also the achieved TFLOP/s from
model.count_flops and its fraction of the device's bf16 peak.

Beside the fast path it times a reference-style data path on the same volume, written from
DESIGN.md's description of the authors' code (not copied from it): bookkeeping over every body
voxel of the scan (np.argwhere + box tests), per-patch numpy augmentations with a 5,000-step
shuffling loop, 100,000-point Bezier curve and np.interp. The speed-up is the ratio of the two
columns measured in this run, so machine noise cancels. The benchmark volume is synthetic,
320 x 320 x 160 voxels (a typical abdominal CT at 1 x 1 x 2 mm), memory-mapped from disk like
preprocessed data.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from augment import augment_batch
from data import PairDataset, collate_pairs
from loss import hybrid_loss, info_nce, reconstruction_loss
from model import count_flops
from downstream import DEMO_ARCHS, pick_device
from pretrain import DEMO, PAPER, build_model

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # dense bf16, vendor datasheets
VOLUME_SHAPE = (320, 320, 160)


# ----------------------------------------------------------------------------- a benchmark volume

def write_volume(root, shape=VOLUME_SHAPE, seed=0):
    """One preprocessed case in the data.py format: an ellipsoidal 'body' with noise inside."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    r2 = sum(((g - s / 2) / (0.45 * s)) ** 2 for g, s in zip(grid, shape))
    body = r2 < 1.0
    image = np.where(body, 0.4 + 0.1 * rng.standard_normal(shape, dtype=np.float32), 0.0).clip(0, 1)
    case = Path(root) / "cases" / "bench_000"
    case.mkdir(parents=True)
    np.save(case / "image.npy", image.astype(np.float16))
    np.save(case / "body.npy", body)
    (case / "meta.json").write_text(json.dumps(dict(format_version=1, case_id="bench_000", shape=list(shape))))
    (Path(root) / "dataset.json").write_text(json.dumps(dict(
        format_version=1, modality="ct", preset=dict(name="ct"), labels=None,
        cases=[dict(id="bench_000", split="unlabelled", labelled=False, shape=list(shape))])))
    return image, body


# ----------------------------------------------------------------------------- reference-style path

def reference_pair(image, body, patch, n, rng):
    """Correspondences the way DESIGN.md says the reference computes them: over every body voxel."""
    coords = np.argwhere(body)                                            # (M, 3): the whole scan
    anchor = coords[rng.integers(len(coords))]
    shape, patch = np.array(image.shape), np.array(patch)
    starts = [np.clip(anchor - rng.integers(0, patch), 0, shape - patch) for _ in range(2)]
    inside = np.all([(coords >= s) & (coords < s + patch) for s in starts], axis=(0, 2))   # (M,)
    chosen = coords[inside][rng.choice(inside.sum(), size=min(n, inside.sum()), replace=False)]
    crops = [np.asarray(image[tuple(slice(a, a + p) for a, p in zip(s, patch))], dtype=np.float32)
             for s in starts]
    return crops, [chosen - s for s in starts]


def reference_augment(x, rng):
    """Per-patch numpy: shuffle (p=0.8, 5000 blocks) -> Bezier (p=0.9, 100k points) -> in-paint (15 boxes)."""
    x = x.copy()
    dims = np.array(x.shape)
    block = np.maximum(1, dims // 20)
    if rng.random() < 0.8:
        for _ in range(5000):
            s = [rng.integers(0, d - b + 1) for d, b in zip(dims, block)]
            window = tuple(slice(a, a + b) for a, b in zip(s, block))
            values = x[window].ravel()
            rng.shuffle(values)
            x[window] = values.reshape(block)
    if rng.random() < 0.9:
        p = np.array([[0, 0], rng.random(2), rng.random(2), [1, 1]])
        t = np.linspace(0, 1, 100_000)[:, None]
        curve = ((1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t ** 2 * p[2] + t ** 3 * p[3])
        x = np.interp(x, np.sort(curve[:, 0]), np.sort(curve[:, 1])).astype(np.float32)
    for _ in range(15):
        size = [rng.integers(d // 10, d // 5 + 1) for d in dims]
        s = [rng.integers(0, d - b + 1) for d, b in zip(dims, size)]
        x[tuple(slice(a, a + b) for a, b in zip(s, size))] = rng.random(size)
    return x


# ----------------------------------------------------------------------------- timing

def timed(fn, device, repeats):
    """Median wall time in ms of fn() over `repeats` runs (after one warm-up), synchronising CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def bench_data(cfg, device, repeats, with_reference):
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        image, body = write_volume(root)
        dataset = PairDataset(root, patch_size=cfg["patch_size"], num_voxels=cfg["num_voxels"], length=10 ** 6)
        B = cfg["batch_pairs"]
        counter = iter(range(10 ** 6))
        batch_of = lambda: collate_pairs([dataset[next(counter)] for _ in range(B)])
        rows["crops + correspondences (CPU, per batch)"] = timed(batch_of, torch.device("cpu"), repeats)
        batch = batch_of()
        xa = batch["patches_a"].to(device)
        g = torch.Generator(device=device).manual_seed(0)
        aug = lambda: (augment_batch(xa, g, cfg["aug"]), augment_batch(xa, g, cfg["aug"]))
        rows[f"augmentations ({device.type}, both views)"] = timed(aug, device, repeats)
        rows["data path total"] = rows["crops + correspondences (CPU, per batch)"] + rows[f"augmentations ({device.type}, both views)"]
        if with_reference:
            rng = np.random.default_rng(0)
            vol = np.load(Path(root) / "cases/bench_000/image.npy", mmap_mode="r")
            msk = np.load(Path(root) / "cases/bench_000/body.npy", mmap_mode="r")
            ref_pairs = lambda: [reference_pair(vol, msk, cfg["patch_size"], cfg["num_voxels"], rng) for _ in range(B)]
            crops = reference_pair(vol, msk, cfg["patch_size"], cfg["num_voxels"], rng)[0]
            ref_aug = lambda: [reference_augment(crops[0], rng) for _ in range(2 * B)]
            ref_repeats = max(1, repeats // 3)
            rows["reference-style: correspondences (numpy, whole scan)"] = timed(ref_pairs, torch.device("cpu"), ref_repeats)
            rows["reference-style: augmentations (numpy, per patch)"] = timed(ref_aug, torch.device("cpu"), ref_repeats)
            rows["reference-style: data path total"] = (rows["reference-style: correspondences (numpy, whole scan)"]
                                                        + rows["reference-style: augmentations (numpy, per patch)"])
    return rows, batch


def bench_model(cfg, batch, device, repeats, amp, compile_model):
    """Forward+backward, loss, optimizer and the whole step, each timed separately."""
    model = build_model(cfg).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last_3d)
    step_model = torch.compile(model) if compile_model else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=device.type == "cuda")
    B = batch["patches_a"].shape[0]
    x = torch.cat([batch["patches_a"], batch["patches_b"]]).to(device)               # (2B, 1, X, Y, Z)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    coords = torch.cat([batch["coords_a"], batch["coords_b"] + torch.tensor([B, 0, 0, 0])]).to(device)
    N = batch["coords_a"].shape[0]
    dtype = torch.bfloat16 if (amp and device.type == "cuda") else None

    def forward():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return step_model(x, coords)

    def losses(z, recon):
        l_c = info_nce(z[:N], z[N:], cfg["temperature"])
        l_r = reconstruction_loss(recon[:B], x[:B], recon[B:], x[B:])
        return hybrid_loss(l_c, l_r, cfg["recon_weight"], cfg["contrastive_weight"])

    def fwd_bwd():
        z, recon = forward()
        (z.float().sum() + recon.float().sum()).backward()

    z, recon = forward()
    z, recon = z.detach().requires_grad_(), recon.detach().requires_grad_()
    rows = {}
    rows["model forward + backward"] = timed(fwd_bwd, device, repeats)
    rows["loss forward + backward"] = timed(lambda: losses(z, recon).backward(), device, repeats)
    rows["optimizer (clip + Adam)"] = timed(lambda: (torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), opt.step()),
                                            device, repeats)
    g = torch.Generator(device=device).manual_seed(0)
    xa, xb = batch["patches_a"].to(device), batch["patches_b"].to(device)

    def step():
        aug = torch.cat([augment_batch(xa, g, cfg["aug"]), augment_batch(xb, g, cfg["aug"])])
        if device.type == "cuda":
            aug = aug.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            z, recon = step_model(aug, coords)
        loss = losses(z, recon)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows["total step (device side: augment + model + loss + optimizer)"] = timed(step, device, repeats)
    extra = {}
    if device.type == "cuda":
        extra["peak memory (GiB)"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    flops = 3 * count_flops(model.config["backbone_config"], cfg["patch_size"]) * 2 * B   # fwd + 2x bwd
    extra["model TFLOP per step (fwd + bwd, backbone)"] = flops / 1e12
    return rows, extra


def bench_probe(checkpoint, steps=600, fold=0):
    """The linear probe two ways on demo fold `fold`, same frozen backbone, same head, same loss:
    the patch loop it replaced (the backbone run on every 2 x 32^3-ish patch of every step, 600
    steps as the old demo preset) vs linear_probe.py (pyramids cached once, head trained on
    them until the loss plateaus). Returns {row: value}."""
    from types import SimpleNamespace
    import downstream
    import finetune
    import linear_probe
    device = torch.device("cpu")
    data_dir = downstream.resolve_data_dir("demo")
    names = downstream.label_names(data_dir)
    train_ids, test_ids = downstream.split_folds(downstream.list_cases(data_dir, labelled=True), 3, 0)[fold]
    args = SimpleNamespace(checkpoint=checkpoint, init=None, seed=0, workers=0, amp=False)
    rows = {}
    # (a) the patch loop: frozen backbone, head trained end to end through it
    torch.manual_seed(0)
    model, _ = downstream.build_segmenter(args, len(names), "linear")
    downstream.set_backbone_trainable(model, False)
    cfg = dict(steps=steps, batch_size=2, patch_size=(32, 32, 16), lr=3e-3, eval_patch_size=(96, 96, 48), aug="none")
    t = time.perf_counter()
    finetune.train_segmenter(model, data_dir, train_ids, cfg, args, device, desc="patch loop")
    rows["patch loop: training (s)"] = time.perf_counter() - t
    dice = downstream.evaluate(model, data_dir, test_ids, len(names), cfg, args, device)
    rows["patch loop: total with evaluation (s)"] = time.perf_counter() - t
    rows["patch loop: mean Dice"] = float(np.nanmean(np.nanmean(dice, axis=1)))
    # (b) cached pyramids
    torch.manual_seed(0)
    model, _ = downstream.build_segmenter(args, len(names), "linear")
    downstream.set_backbone_trainable(model, False)
    pcfg = {**linear_probe.PAPER, **linear_probe.DEMO}
    t = time.perf_counter()
    cache = linear_probe.cache_pyramids(model.backbone, data_dir, train_ids + test_ids, pcfg["eval_patch_size"], device)
    rows["cached: computing the pyramids (s)"] = time.perf_counter() - t
    model.head.set_statistics(*linear_probe.channel_statistics(cache, train_ids))
    labels = {c: np.asarray(downstream.load_case(data_dir, c)["label"]) for c in train_ids + test_ids}
    n, _ = linear_probe.train_head(model.head, cache, labels, train_ids, pcfg, device)
    rows["cached: head training steps (to the plateau)"] = n
    dice = linear_probe.evaluate_cached(model.head, cache, labels, test_ids, len(names), device)
    rows["cached: total with evaluation (s)"] = time.perf_counter() - t
    rows["cached: mean Dice"] = float(np.nanmean(np.nanmean(dice, axis=1)))
    rows["speed-up of the probe (x, totals)"] = rows["patch loop: total with evaluation (s)"] / rows["cached: total with evaluation (s)"]
    print(f"\nlinear probe, demo fold {fold} ({len(train_ids)} train / {len(test_ids)} test cases), {checkpoint}")
    print(f"{'measurement':<52} {'value':>10}")
    print("-" * 63)
    for k, v in rows.items():
        print(f"{k:<52} {v:>10.3f}")
    return rows


def bench_finetune(config, device, repeats):
    """One fine-tuning step of finetune.py's preset (random data, 9 classes) with --aug none vs
    --aug nnunet-like, and the supervised augmentation alone. Returns {row: ms}."""
    from augment import supervised_augment
    from finetune import DEMO as FT_DEMO, PAPER as FT_PAPER, make_optimizer
    from loss import segmentation_loss
    from model import SegmentationModel
    cfg, arch = dict(FT_PAPER), dict(base_channels=32, num_levels=5)
    if config == "demo":
        cfg.update(FT_DEMO)
        arch = DEMO_ARCHS["balanced"]
    model = SegmentationModel(dict(in_channels=1, **arch), 9, head="nonlinear").to(device, memory_format=torch.channels_last_3d)
    optimizer = make_optimizer(model, cfg["lr"])
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(cfg["batch_size"], 1, *cfg["patch_size"], generator=generator, device=device)   # (B, 1, X, Y, Z)
    y = torch.randint(0, 9, (cfg["batch_size"], *cfg["patch_size"]), generator=generator, device=device)

    def step(kind):
        xa, ya = supervised_augment(x, y, generator, kind)
        loss = segmentation_loss(model(xa.contiguous(memory_format=torch.channels_last_3d)), ya)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    rows = {"supervised augmentation alone (--aug nnunet-like)": timed(lambda: supervised_augment(x, y, generator), device, repeats),
            "fine-tuning step, --aug none": timed(lambda: step("none"), device, repeats),
            "fine-tuning step, --aug nnunet-like": timed(lambda: step("nnunet-like"), device, repeats)}
    print(f"\nfine-tuning step, {config} preset ({cfg['batch_size']} patches of {tuple(cfg['patch_size'])}, "
          f"{arch['base_channels']}x{arch['num_levels']} FPN), device {device}, median of {repeats}")
    print(f"{'measurement':<52} {'ms':>10}")
    print("-" * 63)
    for k, v in rows.items():
        print(f"{k:<52} {v:>10.1f}")
    print(f"{'augmentation share of the step (%)':<52} "
          f"{100 * rows['supervised augmentation alone (--aug nnunet-like)'] / rows['fine-tuning step, --aug nnunet-like']:>10.1f}")
    return rows


def main(args):
    if args.probe:
        return bench_probe(args.probe)
    if args.finetune:
        return bench_finetune(args.config, pick_device(args.device), args.steps)
    device = pick_device(args.device)
    cfg = dict(PAPER)
    if args.config == "demo":
        cfg.update(DEMO)
        cfg.update(DEMO_ARCHS[cfg["arch"]])
    else:
        cfg.update(base_channels=32, num_levels=5)
    cfg["patch_size"] = tuple(cfg["patch_size"])
    print(f"bench: config {args.config} ({cfg['batch_pairs']} pairs of {cfg['patch_size']}, {cfg['num_voxels']} voxels "
          f"per pair, {cfg['base_channels']}x{cfg['num_levels']} FPN), device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    rows, batch = bench_data(cfg, device, args.repeats, not args.no_reference)
    extra = {}
    if not args.no_model:
        model_rows, extra = bench_model(cfg, batch, device, args.steps, args.amp, args.compile)
        rows.update(model_rows)
        step_ms = rows["total step (device side: augment + model + loss + optimizer)"]
        if device.type == "cpu":   # the CPU data side runs in DataLoader workers in parallel with the step;
            step_ms = max(step_ms, rows["crops + correspondences (CPU, per batch)"])  # on one core it would add
        extra["patch pairs per second"] = cfg["batch_pairs"] / step_ms * 1e3
        extra["data path share of the step (%)"] = 100 * rows[f"augmentations ({device.type}, both views)"] / step_ms
        if device.type == "cuda":
            tflops = extra["model TFLOP per step (fwd + bwd, backbone)"] / (rows["model forward + backward"] / 1e3)
            extra["achieved TFLOP/s (model fwd + bwd)"] = tflops
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
            if peak:
                extra["fraction of bf16 peak (%)"] = 100 * tflops / peak
    print(f"\n{'measurement':<62} {'value':>12}")
    print("-" * 75)
    for k, v in rows.items():
        print(f"{k + ' (ms)':<62} {v:>12.1f}")
    for k, v in extra.items():
        print(f"{k:<62} {v:>12.2f}")
    if "reference-style: data path total" in rows:
        print(f"{'speed-up of the data path vs reference-style (x)':<62} "
              f"{rows['reference-style: data path total'] / rows['data path total']:>12.1f}")
    return rows, extra


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=["paper", "demo"], default="paper")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed repeats of each model measurement")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each data measurement")
    p.add_argument("--no-model", action="store_true", help="data path only (the paper model on a CPU takes minutes per step)")
    p.add_argument("--no-reference", action="store_true", help="skip the slow reference-style path")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--finetune", action="store_true", help="instead: a fine-tuning step with and without finetune.py's --aug")
    p.add_argument("--probe", metavar="BACKBONE", help="instead: the cached-feature linear probe vs the patch loop it replaced (demo)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
