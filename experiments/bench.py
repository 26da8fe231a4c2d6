"""Where the time of a pretraining step goes, measured: one table, ratios taken in the same run.

    python experiments/bench.py                               # data path at the paper's config on
    this CPU
    python experiments/bench.py --config demo --device cpu    # whole demo step on CPU, bf16 and
    fp32 columns
    python experiments/bench.py --config paper --device cuda  # whole paper step on a GPU (TFLOP/s,
    % of bf16 peak)
    python experiments/bench.py --probe runs/pretrain-demo    # linear probe vs volume size
    python experiments/bench.py --finetune --config demo --steps 20   # fine-tuning step, --aug
    none vs nnunet-like
    python experiments/bench.py --predict runs/ft             # predict.py: single folds vs
    ensemble, mirroring
    python experiments/bench.py --memory                      # what a training step keeps, against
    model.training_bytes

Rows: the data path for one batch (crops + correspondences on the DataLoader side, the
augmentations on the training device), the model forward + backward, the loss, the optimizer,
the total step, peak memory and patch pairs per second, each with bf16 autocast (what --amp does
on this device, when it has bf16) and in fp32; on CUDA also the achieved TFLOP/s from count_flops
and its fraction of the device's bf16 peak.

Beside the fast path it times a reference-style data path on the same volume, written from
the documented behaviour of the authors' code (not copied from it): bookkeeping over every body
voxel of the scan (np.argwhere + box tests), per-patch numpy augmentations with a 5,000-step
shuffling loop, 100,000-point Bezier curve and np.interp. The speed-up is the ratio of the two
columns measured in this run, so machine noise cancels. The benchmark volume is synthetic,
320 x 320 x 160 voxels (a typical abdominal CT at 1 x 1 x 2 mm), memory-mapped from disk like
preprocessed data.
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: the stage files
import data  # noqa: E402
from augment import augment_batch  # noqa: E402
from data import FORMAT_VERSION, PairDataset, collate_pairs  # noqa: E402
from loss import hybrid_loss, info_nce, reconstruction_loss  # noqa: E402
import pretrain  # noqa: E402
import runtime  # noqa: E402
from model import BLOCKS_PER_STAGE  # noqa: E402
from pretrain import build_model, training_step  # noqa: E402
from runtime import amp_dtype, pick_device, positive_int  # noqa: E402

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendor datasheets
VOLUME_SHAPE = (320, 320, 160)


def count_flops(backbone_config, patch_size, recon_head=False):
    """Forward FLOPs (2 x multiply-adds, over all convolutions) of model.FPN3d(**backbone_config)
    on one patch (X, Y, Z), the convention of torch.utils.flop_counter; pooling, BN, ReLU,
    upsampling and additions are not counted. recon_head=True adds PretrainModel's reconstruction
    head. Backward is about twice the forward."""
    cfg = dict(dict(in_channels=1, base_channels=32, num_levels=5), **backbone_config)
    c = [cfg["base_channels"] * 2**l for l in range(cfg["num_levels"])]
    if len(patch_size) != 3:
        raise ValueError(f"count_flops: patch size must be 3 sizes, got {tuple(patch_size)}")
    voxels = [
        math.prod(-(-s // 2**l) for s in patch_size) for l in range(len(c))
    ]  # ceil-mode level sizes

    def conv(c_in, c_out, k, v):
        return 2 * c_in * c_out * k**3 * v

    def block(l):  # one ResBlock3d at level l
        return 2 * conv(c[l], c[l], 3, voxels[l])

    total = conv(cfg["in_channels"], c[0], 3, voxels[0])  # stem
    for l in range(len(c)):
        total += BLOCKS_PER_STAGE * block(l)  # encoder
        if l > 0:
            total += conv(c[l - 1], c[l], 1, voxels[l])  # down 1x1x1
    for l in range(len(c) - 1):
        total += conv(c[l + 1], c[l], 1, voxels[l + 1]) + conv(
            c[l], c[l], 1, voxels[l]
        )  # lateral + skip
        total += BLOCKS_PER_STAGE * block(l)  # decoder
    if recon_head:
        total += conv(c[0], c[0], 3, voxels[0]) + conv(c[0], 1, 1, voxels[0])
    return total


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
    (case / "meta.json").write_text(
        json.dumps(dict(format_version=FORMAT_VERSION, case_id="bench_000", shape=list(shape)))
    )
    (Path(root) / "dataset.json").write_text(
        json.dumps(
            dict(
                format_version=FORMAT_VERSION,
                modality="ct",
                preset=dict(name="ct"),
                labels=None,
                cases=[dict(id="bench_000", split="unlabelled", labelled=False, shape=list(shape))],
            )
        )
    )
    return image, body


# ----------------------------------------------------------------------------- reference-style path


def reference_pair(image, body, patch, n, rng):
    """Correspondences the way the reference computes them (from its description): over every
    body voxel."""
    coords = np.argwhere(body)  # (M, 3): the whole scan
    anchor = coords[rng.integers(len(coords))]
    shape, patch = np.array(image.shape), np.array(patch)
    starts = [np.clip(anchor - rng.integers(0, patch), 0, shape - patch) for _ in range(2)]
    inside = np.all([(coords >= s) & (coords < s + patch) for s in starts], axis=(0, 2))  # (M,)
    chosen = coords[inside][rng.choice(inside.sum(), size=min(n, inside.sum()), replace=False)]
    crops = [
        np.asarray(image[tuple(slice(a, a + p) for a, p in zip(s, patch))], dtype=np.float32)
        for s in starts
    ]
    return crops, [chosen - s for s in starts]


def reference_augment(x, rng):
    """Per-patch numpy: shuffle (p=0.8, 5000 blocks) -> Bezier (p=0.9, 100k points) -> in-paint
    (15 boxes)."""
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
        curve = (
            (1 - t) ** 3 * p[0]
            + 3 * (1 - t) ** 2 * t * p[1]
            + 3 * (1 - t) * t**2 * p[2]
            + t**3 * p[3]
        )
        x = np.interp(x, np.sort(curve[:, 0]), np.sort(curve[:, 1])).astype(np.float32)
    for _ in range(15):
        size = [rng.integers(d // 10, d // 5 + 1) for d in dims]
        s = [rng.integers(0, d - b + 1) for d, b in zip(dims, size)]
        x[tuple(slice(a, a + b) for a, b in zip(s, size))] = rng.random(size)
    return x


# ----------------------------------------------------------------------------- timing


def print_rows(title, rows):
    """One table: a title, then each measurement and its value."""
    width = max(len(k) for k in rows) + 2
    print(f"\n{title}\n{'measurement':<{width}} {'value':>14}\n" + "-" * (width + 15))
    for k, v in rows.items():
        print(f"{k:<{width}} {v if isinstance(v, str) else f'{v:.3f}':>14}")
    return rows


def timed(fn, device, repeats):
    """Median wall time in ms of fn() over `repeats` runs (after a warm-up), synchronising CUDA."""
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
        dataset = PairDataset(
            root, patch_size=cfg["patch_size"], num_voxels=cfg["num_voxels"], length=10**6
        )
        B = cfg["batch_pairs"]
        counter = iter(range(10**6))
        batch_of = lambda: collate_pairs([dataset[next(counter)] for _ in range(B)])
        rows["crops + correspondences (CPU, per batch)"] = timed(
            batch_of, torch.device("cpu"), repeats
        )
        batch = batch_of()
        xa = batch["patches_a"].to(device)
        g = torch.Generator(device=device).manual_seed(0)
        aug = lambda: (augment_batch(xa, g, cfg["aug"]), augment_batch(xa, g, cfg["aug"]))
        rows[f"augmentations ({device.type}, both views)"] = timed(aug, device, repeats)
        rows["data path total"] = (
            rows["crops + correspondences (CPU, per batch)"]
            + rows[f"augmentations ({device.type}, both views)"]
        )
        if with_reference:
            rng = np.random.default_rng(0)
            vol = np.load(Path(root) / "cases/bench_000/image.npy", mmap_mode="r")
            msk = np.load(Path(root) / "cases/bench_000/body.npy", mmap_mode="r")
            ref_pairs = lambda: [
                reference_pair(vol, msk, cfg["patch_size"], cfg["num_voxels"], rng)
                for _ in range(B)
            ]
            crops = reference_pair(vol, msk, cfg["patch_size"], cfg["num_voxels"], rng)[0]
            ref_aug = lambda: [reference_augment(crops[0], rng) for _ in range(2 * B)]
            ref_repeats = max(1, repeats // 3)
            rows["reference-style: correspondences (numpy, whole scan)"] = timed(
                ref_pairs, torch.device("cpu"), ref_repeats
            )
            rows["reference-style: augmentations (numpy, per patch)"] = timed(
                ref_aug, torch.device("cpu"), ref_repeats
            )
            rows["reference-style: data path total"] = (
                rows["reference-style: correspondences (numpy, whole scan)"]
                + rows["reference-style: augmentations (numpy, per patch)"]
            )
    return rows, batch


def conv_peak(device, repeats, dtype=None):
    """This device's practical peak for 3D convolutions: one large 3x3x3 conv (64 -> 64 channels on
    (2, 64, 48, 48, 32), channels_last_3d), forward + backward, in GFLOP/s."""
    conv = torch.nn.Conv3d(64, 64, 3, padding=1).to(device, memory_format=torch.channels_last_3d)
    x = torch.randn(2, 64, 48, 48, 32, device=device).contiguous(
        memory_format=torch.channels_last_3d
    )
    x.requires_grad_(True)

    def fwd_bwd():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            y = conv(x)
        y.float().sum().backward()

    flops = 3 * 2 * 64 * 64 * 27 * x[0, 0].numel() * x.shape[0]  # fwd + 2x bwd, multiply-add = 2
    return flops / (timed(fwd_bwd, device, repeats) / 1e3) / 1e9


def bench_model(cfg, batch, device, repeats, dtype, compile_model):
    """Forward, backward, loss, optimizer and the whole step (pretrain.training_step, the real one),
    each timed separately under autocast to `dtype` (None: fp32); GFLOP/s of the model against
    conv_peak."""
    model = build_model(cfg).to(device, memory_format=torch.channels_last_3d)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    step_model = torch.compile(model) if compile_model else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=device.type == "cuda")
    B = batch["patches_a"].shape[0]
    x = torch.cat([batch["patches_a"], batch["patches_b"]]).to(device)  # (2B, 1, X, Y, Z)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    coords = torch.cat([batch["coords_a"], batch["coords_b"] + torch.tensor([B, 0, 0, 0])]).to(
        device
    )
    N = batch["coords_a"].shape[0]

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
    rows["model forward"] = timed(forward, device, repeats)
    rows["model forward + backward"] = timed(fwd_bwd, device, repeats)
    rows["model backward (difference)"] = rows["model forward + backward"] - rows["model forward"]
    rows["loss forward + backward"] = timed(lambda: losses(z, recon).backward(), device, repeats)
    rows["optimizer (clip + Adam)"] = timed(
        lambda: (torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), opt.step()),
        device,
        repeats,
    )
    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        loss, _ = training_step(step_model, batch, cfg, generator, device, dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows["total step (device side: augment + model + loss + optimizer)"] = timed(
        step, device, repeats
    )
    extra = {}
    if device.type == "cuda":
        extra["peak memory (GiB)"] = torch.cuda.max_memory_allocated(device) / 2**30
    flops = (
        3 * count_flops(model.config["backbone_config"], cfg["patch_size"]) * 2 * B
    )  # fwd + 2x bwd
    extra["model TFLOP per step (fwd + bwd, backbone)"] = flops / 1e12
    extra["model GFLOP/s (fwd + bwd, backbone FLOPs)"] = (
        flops / (rows["model forward + backward"] / 1e3) / 1e9
    )
    extra["one large 3D conv GFLOP/s (fwd + bwd, this device's practical peak)"] = conv_peak(
        device, repeats, dtype
    )
    extra["model / peak (x slower)"] = (
        extra["one large 3D conv GFLOP/s (fwd + bwd, this device's practical peak)"]
        / extra["model GFLOP/s (fwd + bwd, backbone FLOPs)"]
    )
    extra["outside the model share of the step (%)"] = 100 * (
        1
        - rows["model forward + backward"]
        / rows["total step (device side: augment + model + loss + optimizer)"]
    )
    return rows, extra


def full_crop_head(
    head,
    cache,
    labels,
    train_ids,
    device,
    seed=0,
    lr=1e-2,
    crop_size=(192, 192, 96),
    max_steps=5_000,
    window=100,
    tol=0.005,
    max_seconds=None,
):
    """The probe's training before the sampled-voxel solver, kept here as its reference: Adam on the
    head, one whole training volume (or an aligned crop of at most crop_size) per step, soft Dice +
    cross-entropy, until the mean loss of the last `window` steps improves by less than `tol` on
    the window before (or max_steps, or max_seconds). Returns the number of steps."""
    from loss import segmentation_loss
    from linear_probe import as_tensors

    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    rng, m = np.random.default_rng(seed), 2 ** (len(head.convs) - 1)
    history, t0 = [], time.perf_counter()
    while len(history) < max_steps:
        for case_id in rng.permutation(train_ids):
            label = labels[case_id]  # (X, Y, Z)
            crop = None
            if any(s > c for s, c in zip(label.shape, crop_size)):  # aligned random crop
                size = [min(c // m * m, s // m * m) or s for s, c in zip(label.shape, crop_size)]
                crop = (
                    [int(rng.integers(0, (s - n) // m + 1)) * m for s, n in zip(label.shape, size)],
                    size,
                )
                label = label[tuple(slice(s, s + n) for s, n in zip(*crop))]
            y = torch.from_numpy(np.asarray(label, dtype=np.int64))[None].to(device)
            loss = segmentation_loss(head(as_tensors(cache[case_id], device, crop)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(loss.item())
            n = len(history)
            if (
                n >= 2 * window
                and n % window == 0
                and np.mean(history[-2 * window : -window]) - np.mean(history[-window:])
                < tol * np.mean(history[-2 * window : -window])
            ):
                return n
            if n >= max_steps or (max_seconds and time.perf_counter() - t0 > max_seconds):
                return n
    return len(history)


def bench_probe(checkpoint, fold=0, real_scale=1.0, max_seconds=300):
    """linear_probe.py's sampled-voxel head vs the full-crop head it replaced, same frozen backbone,
    same cached pyramids and standardisation, on demo fold `fold` (demo-size phantoms) and on a
    3-case fold of phantoms at `real_scale` (real-scan size). Returns {row: value}."""
    import downstream
    import linear_probe
    import preprocess
    from weights import read_backbone

    device = torch.device("cpu")
    args = linear_probe.parse_args(
        ["--data", "demo", "--checkpoint", str(checkpoint), "--out", "unused"]
    )
    cfg = vars(args)
    backbone = read_backbone(checkpoint, verbose=False)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {
            "demo": data.read_dataset("demo")[0],
            f"real size (scale {real_scale})": preprocess.build_demo(
                Path(tmp) / "real", num_cases=3, unlabelled_cases=0, scale=real_scale
            ),
        }
        for name, data_dir in sets.items():
            info = data.read_dataset(data_dir)[1]
            ids = data.list_cases(info, labelled=True)
            train_ids, test_ids = downstream.split_folds(ids, 3, 0)[fold]
            labels = {
                c: np.asarray(data.read_case(data_dir, c, need_label=True)["label"]) for c in ids
            }
            num_classes = len(info["labels"])
            shape = labels[test_ids[0]].shape
            rows[f"{name}: volume shape (voxels)"] = (
                f"{shape[0]}x{shape[1]}x{shape[2]} ({np.prod(shape) / 1e6:.2f} M)"
            )
            rows[f"{name}: train / test cases"] = f"{len(train_ids)} / {len(test_ids)}"
            for method in (
                "sampled voxels + L-BFGS (linear_probe.py)",
                "full-crop head, Adam to plateau (before)",
            ):
                model, _ = downstream.new_segmenter(
                    args, backbone, num_classes, "linear", device, fold=0
                )
                downstream.set_backbone_trainable(model, False)
                t = time.perf_counter()
                cache = linear_probe.cache_pyramids(
                    model.backbone, data_dir, ids, cfg["eval_patch_size"], device
                )
                t_cache = time.perf_counter() - t
                model.head.set_statistics(*linear_probe.channel_statistics(cache, train_ids))
                t_train = time.perf_counter()
                if method.startswith("sampled"):
                    steps, _ = linear_probe.train_head(
                        model.head, cache, labels, train_ids, cfg, device
                    )
                else:
                    steps = full_crop_head(
                        model.head, cache, labels, train_ids, device, max_seconds=max_seconds
                    )
                t_train = time.perf_counter() - t_train
                dice = linear_probe.evaluate_cached(
                    model.head, cache, labels, test_ids, num_classes, device
                )
                total = time.perf_counter() - t
                key = f"{name}, {method}"
                rows[f"{key}: pyramids (s)"] = t_cache
                rows[f"{key}: head training (s)"] = t_train
                rows[f"{key}: steps / iterations"] = steps
                rows[f"{key}: fold total with evaluation (s)"] = total
                rows[f"{key}: mean Dice"] = float(np.nanmean(np.nanmean(dice, axis=1)))
    return print_rows(
        f"linear probe, fold {fold}, backbone {checkpoint}, {torch.get_num_threads()} threads "
        f"(the full-crop head capped at {max_seconds} s of training)",
        rows,
    )


def bench_finetune(config, device, repeats):
    """One fine-tuning step of finetune.py's preset (random data, 9 classes) with --aug none vs
    --aug nnunet-like, and the supervised augmentation alone. Returns {row: ms}."""
    import finetune
    from supervised_augment import supervised_augment
    from loss import segmentation_loss
    from model import SegmentationModel

    args = finetune.parse_args(
        ["--data", "unused", "--init", "random", "--out", "unused", "--preset", config]
    )
    cfg = {k: getattr(args, k) for k in finetune.CONFIG}
    arch = dict(base_channels=args.base_channels, num_levels=args.num_levels)
    model = SegmentationModel(dict(in_channels=1, **arch), 9, head="nonlinear").to(
        device, memory_format=torch.channels_last_3d
    )
    optimizer = finetune.make_optimizer(model, cfg["lr"])
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(
        cfg["batch_size"], 1, *cfg["patch_size"], generator=generator, device=device
    )  # (B, 1, X, Y, Z)
    y = torch.randint(
        0, 9, (cfg["batch_size"], *cfg["patch_size"]), generator=generator, device=device
    )

    def step(kind):
        xa, ya = supervised_augment(x, y, generator, kind)
        loss = segmentation_loss(model(xa.contiguous(memory_format=torch.channels_last_3d)), ya)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    rows = {
        "supervised augmentation alone, --aug nnunet-like (ms)": timed(
            lambda: supervised_augment(x, y, generator), device, repeats
        ),
        "fine-tuning step, --aug none (ms)": timed(lambda: step("none"), device, repeats),
        "fine-tuning step, --aug nnunet-like (ms)": timed(
            lambda: step("nnunet-like"), device, repeats
        ),
    }
    rows["augmentation share of the step (%)"] = (
        100
        * rows["supervised augmentation alone, --aug nnunet-like (ms)"]
        / rows["fine-tuning step, --aug nnunet-like (ms)"]
    )
    return print_rows(
        f"fine-tuning step, {config} preset ({cfg['batch_size']} patches of "
        f"{tuple(cfg['patch_size'])}, {arch['base_channels']}x{arch['num_levels']} FPN), device "
        f"{device}, median of {repeats}",
        rows,
    )


def bench_predict(run_dir, cases=6, seed=1):
    """predict.py on `cases` new demo phantoms (another seed: held out from every fold): seconds per
    case and mean foreground Dice on the scan's own grid, for each single fold's model and the
    fold ensemble, without and with mirroring. Returns {row: value}."""
    import nibabel as nib
    import predict
    import demo
    from loss import dice_per_class

    device = torch.device("cpu")
    paths = predict.find_models(run_dir)
    models, ckpts = predict.load_ensemble(paths)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        for job in demo.raw_jobs(raw, cases, seed):
            demo.write_case(job)
        scans = sorted((raw / "imagesTr").iterdir())
        labels = [np.asanyarray(nib.load(raw / "labelsTr" / s.name).dataobj) for s in scans]
        setups = {f"fold {i} alone": [i] for i in range(len(models))}
        setups[f"{len(models)}-fold ensemble"] = list(range(len(models)))
        for tta in (False, True):
            for name, chosen in setups.items():
                dice, t = [], time.perf_counter()
                for scan, label in zip(scans, labels):
                    _, pred, _ = predict.predict_scan(
                        scan,
                        [models[i] for i in chosen],
                        [ckpts[i] for i in chosen],
                        device,
                        mirror_axes=(0, 1, 2) if tta else (),
                    )
                    dice.append(np.nanmean(dice_per_class(pred, label, len(ckpts[0]["labels"]))))
                key = f"{name}, {'mirroring (8 flips)' if tta else 'no mirroring'}"
                rows[f"{key}: seconds per case"] = (time.perf_counter() - t) / len(scans)
                rows[f"{key}: mean Dice"] = float(np.mean(dice))
    return print_rows(
        f"predict.py, {run_dir}: {cases} held-out demo phantoms (seed {seed}, e.g. "
        f"{labels[0].shape}), {torch.get_num_threads()} threads",
        rows,
    )


def bench_memory(repeats=1):
    """What one training step keeps for its backward pass, measured as the rise of the process's
    peak resident memory over a forward + backward of PretrainModel on the CPU (each setting in a
    fresh process), against model.training_bytes' lower estimate, bf16 autocast and fp32."""
    import subprocess

    code = """
import sys, gc, torch
sys.path.insert(0, sys.argv[1])
from model import PretrainModel, training_bytes
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))
base, levels, batch, dtype = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[6]
patch = tuple(int(v) for v in sys.argv[5].split('x'))
torch.manual_seed(0)
m = PretrainModel(dict(in_channels=1, base_channels=base,
num_levels=levels)).to(memory_format=torch.channels_last_3d)
x = torch.rand(batch, 1, *patch).contiguous(memory_format=torch.channels_last_3d)
with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bf16'):
    z, r = m(torch.rand(2, 1, 16, 16, 16).contiguous(memory_format=torch.channels_last_3d),
    torch.zeros(4, 4, dtype=torch.long))
(z.sum() + r.sum()).backward(); m.zero_grad(set_to_none=True); del z, r; gc.collect()
before = status('VmRSS')
coords = torch.stack([torch.randint(0, batch, (64,)), *(torch.randint(0, p, (64,)) for p in
patch)], 1)
with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bf16'):
    z, r = m(x, coords)
(z.float().sum() + r.float().sum()).backward()
print((status('VmHWM') - before) / training_bytes(m.backbone.channels, patch, batch),
(status('VmHWM') - before) / 2 ** 20)
"""
    rows = {}
    for dtype in ("bf16", "fp32"):
        for base, levels, patch, batch in (
            (16, 4, "24x24x8", 16),
            (16, 4, "64x64x32", 4),
            (32, 5, "64x64x32", 4),
            (32, 5, "128x128x32", 2),
        ):
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    code,
                    str(Path(__file__).resolve().parents[1]),
                    str(base),
                    str(levels),
                    str(batch),
                    patch,
                    dtype,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            ratio, mib = map(float, out.stdout.split())
            rows[f"{dtype}, {base}x{levels} FPN, {batch} patches of {patch}: measured MiB"] = mib
            rows[
                f"{dtype}, {base}x{levels} FPN, {batch} patches of {patch}: measured / estimate"
            ] = ratio
    return print_rows(
        f"training memory on this CPU, {torch.get_num_threads()} threads (estimate: "
        "model.training_bytes)",
        rows,
    )


def main(args):
    if args.memory:
        return bench_memory()
    if args.predict:
        return bench_predict(args.predict)
    if args.probe:
        return bench_probe(args.probe)
    if args.finetune:
        return bench_finetune(args.config, pick_device(args.device), args.steps)
    device = pick_device(args.device)
    cfg = {
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in vars(pretrain.parse_args(["--data", "unused", "--preset", args.config])).items()
        if k not in runtime.HOW_TO_RUN
    }
    print(
        f"bench: config {args.config} ({cfg['batch_pairs']} pairs of {cfg['patch_size']}, "
        f"{cfg['num_voxels']} voxels per pair, {cfg['base_channels']}x{cfg['num_levels']} FPN), "
        f"device {device}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f", {torch.get_num_threads()} threads"
        )
    )
    rows, batch = bench_data(cfg, device, args.repeats, not args.no_reference)
    columns = {}
    if not args.no_model:  # bf16 autocast where --amp uses it on this device, and fp32
        dtypes = {"bf16": amp_dtype(device), "fp32": None} if amp_dtype(device) else {"fp32": None}
        for name, dtype in dtypes.items():
            model_rows, extra = bench_model(cfg, batch, device, args.steps, dtype, args.compile)
            step_ms = model_rows["total step (device side: augment + model + loss + optimizer)"]
            if (
                device.type == "cpu"
            ):  # the CPU data side runs in DataLoader workers in parallel with the step
                step_ms = max(step_ms, rows["crops + correspondences (CPU, per batch)"])
            extra["patch pairs per second"] = cfg["batch_pairs"] / step_ms * 1e3
            if device.type == "cuda":
                tflops = extra["model TFLOP per step (fwd + bwd, backbone)"] / (
                    model_rows["model forward + backward"] / 1e3
                )
                extra["achieved TFLOP/s (model fwd + bwd)"] = tflops
                peak = next(
                    (
                        v
                        for k, v in BF16_PEAK_TFLOPS.items()
                        if k in torch.cuda.get_device_name(device)
                    ),
                    None,
                )
                if peak:
                    extra["fraction of bf16 peak (%)"] = 100 * tflops / peak
            columns[name] = {**{k + " (ms)": v for k, v in model_rows.items()}, **extra}
    print(f"\n{'measurement':<66} {'value':>12}")
    print("-" * 79)
    for k, v in rows.items():
        print(f"{k + ' (ms)':<66} {v:>12.1f}")
    if "reference-style: data path total" in rows:
        print(
            f"{'speed-up of the data path vs reference-style (x)':<66} "
            f"{rows['reference-style: data path total'] / rows['data path total']:>12.1f}"
        )
    if columns:
        names = list(columns)
        print(
            f"\n{'model step':<66} "
            + " ".join(f"{n:>10}" for n in names)
            + (f" {'fp32 / bf16':>12}" if len(names) == 2 else "")
        )
        print("-" * (79 + 11 * len(names)))
        for k in columns[names[0]]:
            values = [columns[n][k] for n in names]
            ratio = f" {values[1] / values[0]:>12.2f}" if len(names) == 2 and values[0] else ""
            print(f"{k:<66} " + " ".join(f"{v:>10.2f}" for v in values) + ratio)
    return rows, columns


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--config", choices=["paper", "demo"], default="paper")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--steps", type=positive_int, default=5, help="timed repeats of each model measurement"
    )
    p.add_argument(
        "--repeats", type=positive_int, default=5, help="timed repeats of each data measurement"
    )
    p.add_argument(
        "--no-model",
        action="store_true",
        help="data path only (the paper model on a CPU takes minutes per step)",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the slow reference-style path")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--predict",
        metavar="RUN_DIR",
        help="instead: predict.py's fold ensemble and mirroring on held-out "
        "demo phantoms (a finetune.py --out folder)",
    )
    p.add_argument(
        "--finetune",
        action="store_true",
        help="instead: a fine-tuning step with and without finetune.py's --aug",
    )
    p.add_argument(
        "--probe",
        metavar="BACKBONE",
        help="instead: the sampled-voxel linear probe vs the full-crop head it "
        "replaced, demo size and real size",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="instead: a training step's memory against model.training_bytes",
    )
    return runtime.parse(p, argv)


if __name__ == "__main__":
    runtime.cli(main, parse_args)
