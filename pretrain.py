"""Self-supervised pretraining of a 3D FPN with dense, hierarchically balanced voxel embeddings.

Implements Kats, Hirsch & Heinrich 2024, Sec. 2 (Fig. 2), on top of vox2vec (Goncharov et al. 2023):
two overlapping crops of a scan (Sec. 2.2), each augmented independently with local pixel
shuffling, local in-painting and a Bezier intensity curve (Sec. 2.1), one FPN forward for both,
balanced voxel representations sampled at n positive pairs, and the hybrid loss
L = L_c + lambda * L_r (Eq. 1-3) with InfoNCE at tau = 0.1 and MSE reconstruction at lambda = 10.

Run it:
    python pretrain.py --data demo                          # CPU preset, builds data/demo, ~6 min on 2 cores
    python pretrain.py --data DATA_DIR --out runs/ct        # the paper's config (one GPU; see README for speed)
    python pretrain.py --data DATA_DIR --method vox2vec     # the vox2vec baseline (Table 1, row 1)
    python pretrain.py --data DATA_DIR --out runs/ct --resume       # continue an interrupted run
    torchrun --nproc_per_node=4 pretrain.py --data DATA_DIR         # several GPUs (DDP)

What to expect on the demo preset (300 steps of 4 pairs of 32 x 32 x 16 patches, 256 voxel pairs
each; measured by `python evidence.py` on 2 CPU cores, README "Results"): L_c falls from 6.5
(step 10) to 2.44 at step 300, against the chance level ln(2 * 1024 - 1) = 7.62 of 1,024 voxel
pairs per view (0.85 x chance is crossed within the first ~20 steps); L_r from 0.18 to 0.005;
6 minutes. The vox2vec baseline (--method vox2vec): L_c 3.25 at step 300, 4.5 minutes.
Everything a run writes lives in --out: `log.jsonl` (one row per logged step),
`checkpoint.pt` (resumable, written atomically every --checkpoint-every steps and at the end)
and `backbone.pt` (the FPN alone, for linear_probe.py / finetune.py; loads with
`torch.load(..., weights_only=True)`).

Ablations of Table 1 are flags, not code copies (README maps each row to its command):
--arch balanced|vox2vec, --aug local|vox2vec|none, --recon-weight (0 = contrastive only),
--contrastive-weight (0 = restorative only); --method vox2vec is shorthand for the baseline.

Neighbouring methods of the same literature train the same FPN in the same loop on the same
data, and write the same backbone.pt (README, "Neighbouring methods"): --method genesis (Models
Genesis restoration), --method mim (masked image modelling), --method densecl (DenseCL). Only
the loss of a step differs (step_ours / step_genesis / step_mim / step_densecl below, each
citing its paper); their corruption and masks live in augment.py, their losses in loss.py,
their networks, queue and EMA update in model.py.

Distributed: under torchrun every process trains on its own share of the global batch
(--batch-pairs is the GLOBAL number of patch pairs per step, split evenly over processes, so
the learning rate means the same as on one device) and InfoNCE negatives are gathered from all
processes, so the loss equals the single-process loss on the same global batch. Only rank 0
logs and writes files; checkpoints are interchangeable between DDP and single-process runs.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from augment import augment_batch, block_mask, genesis_corrupt
from data import PairDataset, collate_pairs
from loss import dense_matches, densecl_loss, hybrid_loss, info_nce, masked_l1, reconstruction_loss
from convert import read_backbone_file
from downstream import DEMO_ARCHS, atomic_torch_save, make_output_dir, setup_distributed
from model import ARCHS, DenseCLModel, PretrainModel, RestorativeModel, ema_update
from preprocess import resolve_data_dir

CHECKPOINT_VERSION = 2  # 2: FPN3d equal to the reference (skip convs, block biases); all state weights_only-loadable

# The paper's configuration (Sec. 3.2; grad clip from the reference code).
PAPER = dict(
    arch="balanced", base_channels=None, num_levels=None,  # None: take ARCHS[arch]
    aug="local", recon_weight=10.0, contrastive_weight=1.0, temperature=0.1,
    steps=50_000, batch_pairs=10, pairs_per_volume=1, num_voxels=1024, patch_size=(128, 128, 32),
    lr=3e-4, grad_clip=1.0, log_every=50, checkpoint_every=1000,
)
# A CPU-sized version for `--data demo` (phantom.DEMO_SCALE volumes of ~52 x 45 x 20 voxels):
# same method, the demo network of downstream.DEMO_ARCHS (16 base channels, 4 levels) and
# 32 x 32 x 16 patches, about a third of a demo volume, so that a step of 4 pairs takes ~1 s on
# 2 CPU cores and 300 steps fit in well under 10 minutes, with the contrastive loss far below
# chance (it crosses 0.85 x chance within ~20 steps on the demo phantoms).
DEMO = dict(steps=300, batch_pairs=4, num_voxels=256, patch_size=(32, 32, 16), log_every=10,
            checkpoint_every=100)
# --method: ours (the paper), a baseline, or a neighbouring method (README, "Neighbouring
# methods"; the method-specific pieces live in augment.py, loss.py and model.py).
METHODS = {"ours": dict(), "vox2vec": dict(arch="vox2vec", aug="vox2vec", recon_weight=0.0),
           "genesis": dict(), "mim": dict(), "densecl": dict(temperature=0.2)}
# Settings that only some methods read, with the paper-scale defaults (and the demo's, below).
# mim: SimMIM-style masking; the 3D MIM paper's finding is a high ratio (0.75) with small blocks.
# densecl: DenseCL's tau 0.2, lambda 0.5, queue 65,536 and key-encoder momentum 0.999.
METHOD_OPTIONS = {"mim": dict(mask_ratio=0.75, mask_block=(8, 8, 4)),
                  "densecl": dict(dense_weight=0.5, dense_level=3, queue_size=65_536, ema_momentum=0.999)}
# The demo's 300 steps: blocks of 4 x 4 x 2 voxels (8 x 8 x 4 mm, a 32 x 32 x 16 patch is 512
# blocks); DenseCL on level 2 (8 x 8 x 4 locations of a demo patch; level 3 would leave 32), a
# queue of 256 (4 keys per step: filled after 64 steps) and momentum 0.99 (at 0.999 the key
# encoder would keep 74% of its random initialisation after 300 steps).
DEMO_METHOD_OPTIONS = {"mim": dict(mask_block=(4, 4, 2)),
                       "densecl": dict(dense_level=2, queue_size=256, ema_momentum=0.99)}
# Settings a method does not read are left out of its config (and refused as flags).
UNUSED = {"genesis": ("aug", "recon_weight", "contrastive_weight", "temperature"),
          "mim": ("aug", "recon_weight", "contrastive_weight", "temperature"),
          "densecl": ("recon_weight", "contrastive_weight")}
# The columns of log.jsonl after "loss", per method.
LOSS_NAMES = {"ours": ("loss_contrastive", "loss_recon"), "vox2vec": ("loss_contrastive", "loss_recon"),
              "genesis": ("loss_recon",), "mim": ("loss_masked_l1",), "densecl": ("loss_global", "loss_dense")}


# ----------------------------------------------------------------------------- helpers

def unwrap(model):
    return model.module if hasattr(model, "module") else model


def truncate_log(path, step):
    """Drop the rows logged after the checkpoint a run resumes from (they will be logged again)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(r + "\n" for r in rows))
        os.replace(tmp, path)


def log_row(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- config

def resolve_config(args):
    """Paper defaults <- demo preset (--preset demo, the default for --data demo) <- --method <- typed flags."""
    cfg = dict(PAPER)
    demo = (args.preset or ("demo" if args.data == "demo" else "paper")) == "demo"
    if demo:
        cfg.update(DEMO)
    method = args.method or "ours"
    cfg.update(METHODS[method], method=method, **METHOD_OPTIONS.get(method, {}))
    if demo:
        cfg.update(DEMO_METHOD_OPTIONS.get(method, {}))
    for k in UNUSED.get(method, ()):
        del cfg[k]
    all_options = {k for options in METHOD_OPTIONS.values() for k in options}
    misplaced = [k for k, v in vars(args).items() if v is not None and k not in cfg and (k in PAPER or k in all_options)]
    if misplaced:
        raise ValueError(f"--method {method} does not use {', '.join('--' + k.replace('_', '-') for k in misplaced)}")
    given = {k: v for k, v in vars(args).items() if k in cfg and k != "method" and v is not None}
    cfg.update(given)
    if "mask_block" in cfg:
        cfg["mask_block"] = tuple(cfg["mask_block"])
        if not 0 < cfg["mask_ratio"] < 1 or min(cfg["mask_block"]) < 1:
            raise ValueError(f"--mask-ratio must be in (0, 1) and --mask-block >= 1, got {cfg['mask_ratio']}, "
                             f"{cfg['mask_block']}")
    if "ema_momentum" in cfg and not 0 <= cfg["ema_momentum"] < 1:
        raise ValueError(f"--ema-momentum must be in [0, 1), got {cfg['ema_momentum']}")
    if cfg["base_channels"] is None or cfg["num_levels"] is None:
        preset = (DEMO_ARCHS if demo else ARCHS)[cfg["arch"]]
        cfg["base_channels"] = cfg["base_channels"] or preset["base_channels"]
        cfg["num_levels"] = cfg["num_levels"] or preset["num_levels"]
    cfg["patch_size"] = tuple(cfg["patch_size"])
    if cfg["batch_pairs"] % cfg["pairs_per_volume"]:
        raise ValueError(f"--batch-pairs {cfg['batch_pairs']} must be a multiple of --pairs-per-volume")
    for k in ("steps", "batch_pairs", "num_voxels", "pairs_per_volume", "log_every", "checkpoint_every"):
        if cfg[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    if "queue_size" in cfg and cfg["queue_size"] < cfg["batch_pairs"]:
        raise ValueError(f"--queue-size {cfg['queue_size']} is smaller than one step's keys ({cfg['batch_pairs']})")
    if cfg.get("recon_weight") == 0 and cfg.get("contrastive_weight") == 0:
        raise ValueError("--recon-weight and --contrastive-weight are both 0: nothing to train")
    return cfg


def initial_backbone(args, cfg):
    """--init-from FILE (ours or the authors' released weights, convert.py): continue
    pretraining from them. Sets cfg's FPN size from the file; returns the state dict or None.
    A resumed run (--resume with a checkpoint) starts from its checkpoint instead."""
    if not args.init_from:
        return None
    config, state, _ = read_backbone_file(args.init_from)
    for k in ("base_channels", "num_levels"):
        if getattr(args, k) not in (None, config[k]):
            raise ValueError(f"--{k.replace('_', '-')} {getattr(args, k)} contradicts {args.init_from} ({config[k]})")
        cfg[k] = config[k]
    cfg["init_from"] = str(args.init_from)
    return state


def build_model(cfg):
    """The network a method trains; every one has .backbone (the FPN3d saved in backbone.pt)."""
    backbone_config = dict(in_channels=1, base_channels=cfg["base_channels"], num_levels=cfg["num_levels"])
    if cfg["method"] in ("genesis", "mim"):
        return RestorativeModel(backbone_config, mask_token=cfg["method"] == "mim")
    if cfg["method"] == "densecl":
        return DenseCLModel(backbone_config, level=cfg["dense_level"], queue_size=cfg["queue_size"])
    return PretrainModel(backbone_config, arch=cfg["arch"])


# ----------------------------------------------------------------------------- training

def make_loader(data_dir, cfg, seed, start_step, rank, world, workers):
    """Item k of the dataset is a fixed function of (seed, k), and step s of rank r reads items
    [(s * world + r) * m, ... + m) with m pairs-items per rank, so a resumed run and a run with
    another worker count see exactly the same data (data.py: per-item generators)."""
    per_rank = cfg["batch_pairs"] // world
    items = per_rank // cfg["pairs_per_volume"]
    dataset = PairDataset(data_dir, patch_size=cfg["patch_size"], num_voxels=cfg["num_voxels"],
                          pairs_per_volume=cfg["pairs_per_volume"], length=cfg["steps"] * world * items,
                          seed=seed)
    order = [(s * world + rank) * items + j for s in range(start_step, cfg["steps"]) for j in range(items)]
    return torch.utils.data.DataLoader(
        dataset, batch_size=items, sampler=order, collate_fn=collate_pairs, num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)


def gather_embeddings(za, zb, max_voxels):
    """All processes' embeddings, differentiably, so InfoNCE sees the global batch's negatives.

    Each process pads its (N, D) rows to the static max_voxels (a pair can yield fewer voxels
    than asked, data.sample_pair) and marks the padding in `valid`, so no sizes have to be
    exchanged. Backward: each process's loss is the same global loss, the gradient of the
    gathered copy is summed over processes (all_reduce) and each keeps its own chunk; DDP's
    averaging of parameter gradients then gives exactly the single-process gradient.
    Returns (za, zb, valid) with (W * max_voxels, D) rows, or the inputs and None for one process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return za, zb, None
    pad = max_voxels - za.shape[0]
    valid = torch.arange(max_voxels, device=za.device) < za.shape[0]          # (max_voxels,)
    za, zb = (torch.nn.functional.pad(z, (0, 0, 0, pad)) for z in (za, zb))  # (max_voxels, D)
    return _GatherRows.apply(za), _GatherRows.apply(zb), _GatherRows.apply(valid.float()).bool()


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient over processes and keeps this one's rows."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def training_step(model, batch, cfg, generator, device, amp_dtype):
    """One step's loss for cfg["method"]: (loss, [its parts, named by LOSS_NAMES]) tensors.
    No host-device synchronisation happens in here."""
    step = {"genesis": step_genesis, "mim": step_mim, "densecl": step_densecl}.get(cfg["method"], step_ours)
    return step(model, batch, cfg, generator, device, amp_dtype)


def step_ours(model, batch, cfg, generator, device, amp_dtype):
    """Ours and vox2vec: one forward of both augmented views; L_c (Eq. 1) and L_r (Eq. 2)."""
    B = batch["patches_a"].shape[0]
    xa = batch["patches_a"].to(device, non_blocking=True)  # (B, 1, X, Y, Z) un-augmented: the Eq. 2 target
    xb = batch["patches_b"].to(device, non_blocking=True)
    # View B's patches sit after view A's in the stacked batch; shifted on the host, before the copy.
    coords = torch.cat([batch["coords_a"], batch["coords_b"] + torch.tensor([B, 0, 0, 0])])  # (2N, 4)
    coords = coords.to(device, non_blocking=True)
    x = torch.cat([augment_batch(xa, generator, cfg["aug"]), augment_batch(xb, generator, cfg["aug"])])  # (2B, 1, X, Y, Z)
    x = x.contiguous(memory_format=torch.channels_last_3d)   # faster 3D convs on GPU and CPU alike
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        z, recon = model(x, coords)                        # (2N, 128), (2B, 1, X, Y, Z)
    N = batch["coords_a"].shape[0]
    za, zb, valid = gather_embeddings(z[:N], z[N:], cfg["num_voxels"] * B)
    l_c = info_nce(za, zb, cfg["temperature"], valid)                    # Eq. 1
    l_r = reconstruction_loss(recon[:B], xa, recon[B:], xb)              # Eq. 2
    loss = hybrid_loss(l_c, l_r, cfg["recon_weight"], cfg["contrastive_weight"])  # Eq. 3
    return loss, [l_c, l_r]


def both_views(batch, device):
    """The 2B patches of a batch of B pairs, as independent patches (genesis and mim use no pairs;
    reading the same pairs keeps every method on exactly the same data). -> (2B, 1, X, Y, Z)."""
    x = torch.cat([batch["patches_a"], batch["patches_b"]]).to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d)


def step_genesis(model, batch, cfg, generator, device, amp_dtype):
    """Models Genesis (Zhou et al. 2021): restore the original patch from its corruption
    (augment.genesis_corrupt: shuffling, Bezier, in- or out-painting) with MSE; no L_c. Equals
    Table 1's "L_r only" row of the paper with out-painting added and the rates of Models Genesis."""
    x = both_views(batch, device)
    corrupted = genesis_corrupt(x, generator).contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        recon = model(corrupted)                                   # (2B, 1, X, Y, Z)
    l_r = torch.nn.functional.mse_loss(recon.float(), x.float())
    return l_r, [l_r]


def step_mim(model, batch, cfg, generator, device, amp_dtype):
    """Masked image modelling, SimMIM-style (Xie et al. 2022; for 3D CT/MRI: Chen et al. 2023,
    "Masked image modeling advances 3D medical image analysis"): mask_ratio of the patch's
    mask_block cells replaced by a learned value, the original voxels predicted by the light
    reconstruction head, L1 on the masked voxels only.

    From a ViT to a CNN: a ViT drops (MAE) or replaces (SimMIM) whole tokens, so a masked token
    carries nothing of its content. A CNN sees every voxel, and convolutions mix neighbours, so
    (1) masked voxels are replaced by the mask value in the input, before the first convolution:
    no layer ever sees a masked intensity; (2) the loss is on masked voxels only: on visible ones
    the identity would be rewarded; (3) masks are blocks of several voxels at a high ratio, not
    single voxels: a masked voxel inside a block is several voxels from any visible one, which a
    3x3x3 convolution cannot bridge by interpolation. What does still pass is the mask pattern
    (the network knows where the holes are, as SimMIM's token does); BatchNorm's statistics
    mix masked and visible voxels, which fine-tuning re-estimates (finetune.py)."""
    x = both_views(batch, device)
    mask = block_mask(x.shape, generator, cfg["mask_ratio"], cfg["mask_block"], device)   # (2B, 1, X, Y, Z)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        recon = model(x, mask)
    l1 = masked_l1(recon, x, mask)
    return l1, [l1]


def step_densecl(model, batch, cfg, generator, device, amp_dtype):
    """DenseCL (Wang et al. 2021; the seed poster applies it to 2-D ultrasound): view A through
    the query encoder, view B through the EMA key encoder. Global loss: MoCo on pooled features.
    Dense loss: each query location's positive is the key location whose *backbone feature* is
    most similar (argmax cosine), not the geometrically corresponding one; negatives are the
    dense queue. L = (1 - lambda) L_global + lambda L_dense, tau = 0.2, lambda = 0.5.

    Adapted to the 3D FPN: the dense head and the matching use one FPN level, --dense-level
    (paper preset: level 3, 1/8 resolution, 16 x 16 x 4 = 1,024 locations of a 128 x 128 x 32
    patch; demo: level 2, 8 x 8 x 4 = 256 of a 32 x 32 x 16 patch). DenseCL uses ResNet's C5
    (7 x 7 = 49 locations); matching costs (locations)^2 per pair, so a finer level is
    quadratically dearer (level 2 of a paper patch: 67 M similarities per pair), a coarser one
    leaves too few locations. The global head pools the coarsest level (the FPN's C5). The views
    are our overlapping crops with the local augmentations, as for ours: only the matching
    differs. No shuffle-BN (MoCo's guard against BatchNorm leaking across a batch under DDP)."""
    core = unwrap(model)
    xq = augment_batch(batch["patches_a"].to(device, non_blocking=True), generator, cfg["aug"])
    xk = augment_batch(batch["patches_b"].to(device, non_blocking=True), generator, cfg["aug"])
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        (q_global, q_dense, f_q), (k_global, k_dense, f_k) = model(
            xq.contiguous(memory_format=torch.channels_last_3d), xk.contiguous(memory_format=torch.channels_last_3d))
    match = dense_matches(f_q.detach(), f_k)                                # (B, S_q)
    loss, l_global, l_dense = densecl_loss(q_global, k_global, core.queue_global.keys.clone(), q_dense, k_dense,
                                           match, core.queue_dense.keys.clone(), cfg["temperature"],
                                           cfg["dense_weight"])
    core.queue_global.enqueue(gather_keys(k_global))
    core.queue_dense.enqueue(gather_keys(torch.nn.functional.normalize(k_dense.mean(2), dim=1)))
    return loss, [l_global, l_dense]


@torch.no_grad()
def gather_keys(k):
    """Every process's keys, in rank order (MoCo enqueues the global batch's), or k alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts)


def save_run(run_dir, model, optimizer, cfg, args, step):
    core = unwrap(model)
    state = dict(version=CHECKPOINT_VERSION, step=step, config=cfg, args=vars(args),
                 model_config=core.config, model=core.state_dict(), optimizer=optimizer.state_dict(),
                 rng=dict(torch=torch.get_rng_state(), numpy=numpy_rng_state(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))
    atomic_torch_save(state, run_dir / "checkpoint.pt")
    # The backbone alone, plain tensors and builtins only (weights_only=True loads it).
    atomic_torch_save(dict(version=CHECKPOINT_VERSION, kind="backbone", step=step,
                           backbone_config=dict(core.config["backbone_config"]), arch=cfg["arch"],
                           pretrain_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                           state_dict=core.backbone.state_dict()),
                      run_dir / "backbone.pt")


def load_run(run_dir, model, optimizer, cfg):
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        raise ValueError(f"--resume: no checkpoint at {path}")
    try:  # tensors and builtins only: a crafted pickle cannot run code here
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a checkpoint this code can read safely ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise ValueError(f"{path}: checkpoint version {version}, this code writes {CHECKPOINT_VERSION} "
                         "(version 2 changed the FPN to the reference's); start a new run folder")
    # Refuse, rather than silently ignore or half-apply, a changed setting: only the run's length
    # and its logging / checkpoint cadence may change on resume (README, "Reliability").
    may_change = ("steps", "log_every", "checkpoint_every")
    state["config"].setdefault("method", cfg["method"])     # written before --method was recorded
    changed = [f"--{k.replace('_', '-')} {tuple_or(state['config'].get(k))} -> {tuple_or(cfg.get(k))}"
               for k in sorted(set(cfg) | set(state["config"]))
               if k not in may_change and tuple_or(state["config"].get(k)) != tuple_or(cfg.get(k))]
    if changed:
        raise ValueError(f"{path}: --resume with settings that differ from the saved run ({'; '.join(changed)}); "
                         "resume with the same flags, or start a new --out")
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    set_numpy_rng_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def numpy_rng_state():
    """np.random's global state as tensors and builtins (weights_only-loadable, unlike its tuple)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                has_gauss=int(has_gauss), gauss=float(gauss))


def set_numpy_rng_state(s):
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))


def tuple_or(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def main(args):
    try:
        rank, world, device = setup_distributed(args.device)
        cfg = resolve_config(args)
        if cfg["batch_pairs"] % (world * cfg["pairs_per_volume"]):
            raise ValueError(f"--batch-pairs {cfg['batch_pairs']} is the global batch: it must split evenly "
                             f"over {world} processes x --pairs-per-volume {cfg['pairs_per_volume']}")
        data_dir = resolve_data_dir(args.data)
        run_dir = Path(args.out or ("runs/pretrain-demo" if args.data == "demo" else "runs/pretrain"))
        torch.manual_seed(args.seed)
        init = initial_backbone(args, cfg)       # --init-from: the file decides the FPN's size
        model = build_model(cfg)
        if init is not None:
            model.backbone.load_state_dict(init)
            if cfg["method"] == "densecl":
                model.reset_key()                # the key encoder starts as the query encoder
        model = model.to(device)
        amp_dtype = torch.bfloat16 if device.type == "cuda" and args.amp else None
        if device.type == "cpu":
            torch.set_flush_denormal(True)   # denormal activations slowed CPU steps by up to 1.5x (measured)
        torch.backends.cudnn.benchmark = True
        # channels_last_3d: measured ~1.8x faster 3x3x3 convs on this 2-core CPU too (bench.py).
        model = model.to(memory_format=torch.channels_last_3d)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=device.type == "cuda")
        start = 0
        if args.resume and (run_dir / "checkpoint.pt").exists():
            start = load_run(run_dir, model, optimizer, cfg)
        elif args.resume:
            raise ValueError(f"--resume: no checkpoint at {run_dir / 'checkpoint.pt'}")
        elif any((run_dir / name).exists() for name in ("checkpoint.pt", "log.jsonl")):
            raise ValueError(f"{run_dir} already holds a run (checkpoint.pt / log.jsonl): continue it with "
                             "--resume, or choose another --out")
        loader = make_loader(data_dir, cfg, args.seed, start, rank, world, args.workers)
        if rank == 0:
            make_output_dir(run_dir)
    except ValueError as e:
        sys.exit(f"pretrain.py: error: {e}")
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(model) if args.compile else model
    if rank == 0:
        if start > 0:
            truncate_log(run_dir / "log.jsonl", start)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"pretrain: {world} process(es) on {device}, data {data_dir}, run dir {run_dir}, "
              f"{n_params / 1e6:.2f} M parameters, starting at step {start}")
        print("config: " + json.dumps({k: v for k, v in cfg.items()}))
    generator = torch.Generator(device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)       # any non-finite loss since the last check
    names = LOSS_NAMES[cfg["method"]]
    sums = torch.zeros(1 + len(names), device=device)
    t0, n_logged = time.time(), 0
    bar = tqdm(total=cfg["steps"], initial=start, disable=rank != 0, dynamic_ncols=True)
    model.train()
    step = start
    for batch in loader:
        # Augmentations are a fixed function of (seed, step, rank): resuming reproduces them.
        generator.manual_seed((args.seed * 1_000_003 + step) * 64 + rank)
        loss, parts = training_step(step_model, batch, cfg, generator, device, amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        if cfg["method"] == "densecl":      # MoCo's momentum update of the key encoder, after the step
            ema_update(unwrap(model).key, unwrap(model).query, cfg["ema_momentum"])
        step += 1
        bad |= ~torch.isfinite(loss.detach())
        sums += torch.stack([loss.detach(), *[p.detach() for p in parts]]).float()
        n_logged += 1
        last = step == cfg["steps"]
        if step % cfg["log_every"] == 0 or last or step % cfg["checkpoint_every"] == 0:
            if world > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                dist.all_reduce(sums)
                sums /= world
            if bad.item():   # the only host sync: every log_every steps
                if rank == 0:
                    ck = run_dir / "checkpoint.pt"
                    where = f"the last good checkpoint is {ck}" if ck.exists() else "no checkpoint was written yet"
                    print(f"pretrain.py: non-finite loss between steps {step - n_logged + 1} and {step}; "
                          f"stopping. {where} (try a lower --lr).", file=sys.stderr)
                sys.exit(1)
            mean = (sums / n_logged).tolist()
            row = dict(step=step, loss=mean[0], **dict(zip(names, mean[1:])),
                       lr=optimizer.param_groups[0]["lr"], seconds=round(time.time() - t0, 3))
            if rank == 0:
                log_row(run_dir / "log.jsonl", row)
                bar.set_postfix(loss=f"{mean[0]:.4f}", **{n.replace("loss_", ""): f"{v:.4f}" for n, v in zip(names, mean[1:])})
            sums.zero_()
            n_logged = 0
            if rank == 0 and (step % cfg["checkpoint_every"] == 0 or last):
                save_run(run_dir, model, optimizer, cfg, args, step)
        bar.update(1)
    bar.close()
    if rank == 0:
        print(f"done: {step} steps; backbone for linear_probe.py / finetune.py: {run_dir / 'backbone.pt'}")
    if world > 1:
        dist.destroy_process_group()
    return run_dir


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Data and run folder
    p.add_argument("--data", required=True, help="preprocessed DATA_DIR (preprocess.py), or 'demo'")
    p.add_argument("--out", help="run folder (default runs/pretrain or runs/pretrain-demo)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--init-from", help="start from these backbone weights: our backbone.pt or the authors' "
                                       "released files (convert.py lists the formats)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(4, max(1, (os.cpu_count() or 2) - 1)),
                   help="DataLoader processes reading memory-mapped patches")
    p.add_argument("--preset", choices=["paper", "demo"], help="defaults to start from [demo for --data demo, else paper]")
    # Method (Table 1 ablations). None means: the paper's value (or the demo preset's)
    p.add_argument("--method", choices=sorted(METHODS),
                   help="ours (the paper), the vox2vec baseline, or a neighbouring method: genesis (Models "
                        "Genesis), mim (masked image modelling), densecl [ours]")
    p.add_argument("--arch", choices=sorted(ARCHS), help="voxel representation / FPN preset (Sec. 2.2) [balanced]")
    p.add_argument("--base-channels", type=int, help="FPN width at full resolution [from --arch]")
    p.add_argument("--num-levels", type=int, help="FPN levels [from --arch]")
    p.add_argument("--aug", choices=["local", "vox2vec", "none"], help="augmentations (Sec. 2.1) [local]")
    p.add_argument("--recon-weight", type=float, help="lambda of Eq. 3; 0 = contrastive only [10]")
    p.add_argument("--contrastive-weight", type=float, help="weight of L_c; 0 = restorative only [1]")
    p.add_argument("--temperature", type=float, help="tau of Eq. 1 [0.1]")
    # Neighbouring methods' own settings (refused with any other --method)
    p.add_argument("--mask-ratio", type=float, help="mim: fraction of blocks masked [0.75]")
    p.add_argument("--mask-block", type=int, nargs=3, help="mim: block (X, Y, Z) voxels [8 8 4; demo 4 4 2]")
    p.add_argument("--dense-level", type=int, help="densecl: FPN level of the dense head and matching [3; demo 2]")
    p.add_argument("--dense-weight", type=float, help="densecl: lambda, weight of the dense loss [0.5]")
    p.add_argument("--queue-size", type=int, help="densecl: negatives per queue [65536; demo 256]")
    p.add_argument("--ema-momentum", type=float, help="densecl: key-encoder momentum [0.999; demo 0.99]")
    # Optimisation (Sec. 3.2)
    p.add_argument("--steps", type=int, help="[50000; demo 300]")
    p.add_argument("--batch-pairs", type=int, help="patch pairs per step, global over processes [10; demo 4]")
    p.add_argument("--pairs-per-volume", type=int, help="pairs cropped from one scan (reference: all) [1]")
    p.add_argument("--num-voxels", type=int, help="positive pairs sampled per patch pair [1024; demo 256]")
    p.add_argument("--patch-size", type=int, nargs=3, help="(X, Y, Z) voxels [128 128 32; demo 48 48 16]")
    p.add_argument("--lr", type=float, help="Adam learning rate [3e-4]")
    p.add_argument("--grad-clip", type=float, help="gradient-norm clip [1.0]")
    # Logging, checkpoints and speed
    p.add_argument("--log-every", type=int, help="steps between log rows (and the only host syncs) [50; demo 10]")
    p.add_argument("--checkpoint-every", type=int, help="[1000; demo 100]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
