"""DenseCL (Wang et al. 2021; the seed poster applies it to 2-D ultrasound) on our FPN: a dense
contrastive loss whose positives come from feature similarity instead of geometry.

View A goes through the query encoder, view B through its exponential moving average (the key
encoder, no gradient). Global loss: MoCo on pooled features, negatives from a queue. Dense loss:
each query location's positive is the key location whose *backbone feature* is most similar
(argmax cosine), not the geometrically corresponding one; negatives are the dense queue (one
pooled key vector per image). L = (1 - lambda) L_global + lambda L_dense, tau = 0.2, lambda = 0.5,
queue 65,536, momentum 0.999 (DenseCL's values).

Adapted to the 3D FPN: the dense head and the matching use one level, --dense-level (paper preset
3: 16 x 16 x 4 = 1,024 locations of a 128 x 128 x 32 patch; demo 2: 6 x 6 x 2 of a 24 x 24 x 8
patch). DenseCL uses ResNet's C5 (7 x 7 = 49 locations); matching costs (locations)^2 per pair,
so a finer level is quadratically dearer, a coarser one leaves too few locations. The global head
pools the coarsest level. The decoder below the dense level feeds no loss and stays at its
initialisation (frozen, which DDP needs). The views are our overlapping crops with the local
augmentations, as for ours: only the matching differs. No shuffle-BN.

    python experiments/neighbours/densecl.py --data demo --out runs/densecl-demo
    python experiments/neighbours/densecl.py --data DATA_DIR --out runs/densecl

Every pretrain.py flag applies; writes the same backbone.pt for linear_probe.py and finetune.py.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: the stage files
import pretrain  # noqa: E402
import runtime  # noqa: E402
from augment import KINDS, augment_batch  # noqa: E402
from data import InputError  # noqa: E402
from model import FPN3d  # noqa: E402
from experiments.neighbours.common import ema_update, frozen_copy  # noqa: E402
# noqa: E402
from runtime import below_one, non_negative_int, positive_float, positive_int, unit_interval

# The demo's budget: level 2 (level 3 of a demo patch leaves 32 locations), a queue of 256 (4 keys
# per step: full after 64 steps), momentum 0.99 (at 0.999 the key encoder would keep 74% of its
# random initialisation after 300 steps).
DEMO = dict(dense_level=2, queue_size=256, ema_momentum=0.99)


# ----------------------------------------------------------------------------- network


class Queue(nn.Module):
    """A first-in-first-out queue of K unit vectors (MoCo's negatives), held as buffers so it is
    saved in checkpoints and moves with .to(device). Starts as random unit vectors, as MoCo's.
    enqueue(keys (n, D)) overwrites the n oldest entries, in order; the write position stays a
    device tensor (no host sync)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        size = self.keys.shape[0]
        if keys.shape[0] > size:
            raise ValueError(
                f"Queue: {keys.shape[0]} keys at once, more than the queue size {size}"
            )
        index = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.keys[index] = keys.detach().to(self.keys.dtype)
        self.ptr.copy_((self.ptr + keys.shape[0]) % size)


class DenseCLEncoder(nn.Module):
    """One encoder: the FPN, a global head (average pool of the coarsest level -> MLP -> D) and a
    dense head (1x1x1 conv -> ReLU -> 1x1x1 conv -> D at `level`). forward(x) -> (global (B, D),
    dense (B, D, S), backbone features at level (B, C_l, S)), global and dense L2-normalised
    along D; S = the level's voxels, flattened."""

    def __init__(self, backbone_config: dict, level: int, dim: int = 128, hidden_dim: int = 512):
        super().__init__()
        self.backbone = FPN3d(**backbone_config)
        channels = self.backbone.channels
        if not 0 <= level < len(channels):
            raise InputError(
                f"--dense-level {level} outside the FPN's levels 0..{len(channels) - 1}"
            )
        self.level = level
        for l in range(level):  # the decoder below `level` feeds neither loss: frozen
            for part in (self.backbone.lateral[l], self.backbone.skip[l], self.backbone.decoder[l]):
                part.requires_grad_(False)
        self.global_head = nn.Sequential(
            nn.Linear(channels[-1], hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim)
        )
        self.dense_head = nn.Sequential(
            nn.Conv3d(channels[level], hidden_dim, 1),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden_dim, dim, 1),
        )

    def forward(self, x: torch.Tensor):
        pyramid = self.backbone(x)
        g = F.normalize(self.global_head(pyramid[-1].mean((2, 3, 4))).float(), dim=1)  # (B, D)
        d = F.normalize(self.dense_head(pyramid[self.level]).flatten(2).float(), dim=1)  # (B, D, S)
        return g, d, pyramid[self.level].flatten(2)


class DenseCLModel(nn.Module):
    """Query encoder (trained), key encoder (its EMA), and the global and dense queues.
    `backbone` is the query encoder's FPN (what backbone.pt holds)."""

    def __init__(
        self,
        backbone_config: dict,
        level: int,
        queue_size: int,
        dim: int = 128,
        hidden_dim: int = 512,
    ):
        super().__init__()
        self.config = dict(
            backbone_config=dict(backbone_config),
            level=level,
            queue_size=queue_size,
            dim=dim,
            hidden_dim=hidden_dim,
        )
        self.query = DenseCLEncoder(backbone_config, level, dim, hidden_dim)
        self.key = frozen_copy(self.query)
        self.queue_global = Queue(queue_size, dim)
        self.queue_dense = Queue(queue_size, dim)

    @property
    def backbone(self) -> FPN3d:
        return self.query.backbone

    @torch.no_grad()
    def reset_key(self) -> None:
        """Key encoder := query encoder (after loading --init-from weights into the query)."""
        self.key.load_state_dict(self.query.state_dict())

    def forward(self, x_query: torch.Tensor, x_key: torch.Tensor):
        """-> (query outputs, key outputs), each as DenseCLEncoder's; the key encoder runs without
        gradient (in train mode, as MoCo's)."""
        with torch.no_grad():
            keys = self.key(x_key)
        return self.query(x_query), keys


# ----------------------------------------------------------------------------- loss


def moco_loss(q, k, queue, temperature=0.2):
    """MoCo's InfoNCE: each query's positive is its key, its negatives the queue.
    q, k: (N, D) unit vectors; queue: (K, D). -> mean over the N queries of
    -log softmax(<q, k> / tau among [<q, k>, <q, queue_j>])."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, queue = q.to(dtype), k.to(dtype), queue.to(dtype)
        positive = (q * k).sum(1, keepdim=True)  # (N, 1)
        logits = torch.cat([positive, q @ queue.T], 1) / temperature  # (N, 1 + K)
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def dense_matches(features_q, features_k):
    """DenseCL's correspondence: for each query location, the key location whose backbone
    feature is most similar (argmax of the cosine). features_*: (B, C, S) -> (B, S_q) int64."""
    fq = F.normalize(features_q.float(), dim=1)
    fk = F.normalize(features_k.float(), dim=1)
    return torch.einsum("bcs,bct->bst", fq, fk).argmax(2)


def densecl_loss(
    q_global,
    k_global,
    queue_global,
    q_dense,
    k_dense,
    match,
    queue_dense,
    temperature=0.2,
    dense_weight=0.5,
):
    """DenseCL Eq. 3-4: (1 - lambda) * global MoCo loss + lambda * dense loss, the dense positive of
    query location s being key location match[b, s]. q_global, k_global: (B, D); q_dense,
    k_dense: (B, D, S) unit vectors along D; match: (B, S_q). -> (loss, global, dense)."""
    l_global = moco_loss(q_global, k_global, queue_global, temperature)
    positive = k_dense.gather(2, match[:, None, :].expand(-1, k_dense.shape[1], -1))  # (B, D, S_q)
    flat = lambda t: t.permute(0, 2, 1).reshape(-1, t.shape[1])  # (B * S, D)
    l_dense = moco_loss(flat(q_dense), flat(positive), queue_dense, temperature)
    return (1 - dense_weight) * l_global + dense_weight * l_dense, l_global, l_dense


@torch.no_grad()
def gather_keys(k):
    """Every process's keys, in rank order (MoCo enqueues the global batch's), or k alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------- the plug into
# pretrain.py


def build_model(cfg, backbone_state=None):
    model = DenseCLModel(
        dict(in_channels=1, base_channels=cfg["base_channels"], num_levels=cfg["num_levels"]),
        level=cfg["dense_level"],
        queue_size=cfg["queue_size"],
    )
    if backbone_state is not None:
        model.backbone.load_state_dict(backbone_state)
        model.reset_key()  # the key encoder starts as the query encoder
    return model


def unwrap(model):
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def densecl_step(model, batch, cfg, generator, device, amp_dtype):
    """DenseCL's step: global MoCo + a dense loss of similarity-matched positives; keys queued."""
    core = unwrap(model)
    xq = augment_batch(batch["patches_a"].to(device, non_blocking=True), generator, cfg["aug"])
    xk = augment_batch(batch["patches_b"].to(device, non_blocking=True), generator, cfg["aug"])
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        (q_global, q_dense, f_q), (k_global, k_dense, f_k) = model(
            xq.contiguous(memory_format=torch.channels_last_3d),
            xk.contiguous(memory_format=torch.channels_last_3d),
        )
    match = dense_matches(f_q.detach(), f_k)  # (B, S_q)
    loss, l_global, l_dense = densecl_loss(
        q_global,
        k_global,
        core.queue_global.keys.clone(),
        q_dense,
        k_dense,
        match,
        core.queue_dense.keys.clone(),
        cfg["temperature"],
        cfg["dense_weight"],
    )
    core.queue_global.enqueue(gather_keys(k_global))
    core.queue_dense.enqueue(gather_keys(F.normalize(k_dense.mean(2), dim=1)))
    return loss, dict(loss_global=l_global, loss_dense=l_dense)


def momentum_update(model, cfg, step=None):
    """MoCo's momentum update of the key encoder, after the optimizer's step."""
    ema_update(unwrap(model).key, unwrap(model).query, cfg["ema_momentum"])


def add_arguments(p):
    p.add_argument(
        "--aug", choices=KINDS, default="local", help="augmentations of both views (Sec. 2.1)"
    )
    p.add_argument(
        "--temperature", type=positive_float, default=0.2, help="tau of both MoCo losses"
    )
    p.add_argument(
        "--dense-level",
        type=non_negative_int,
        default=3,
        help="FPN level of the dense head and matching",
    )
    p.add_argument(
        "--dense-weight", type=unit_interval, default=0.5, help="lambda, weight of the dense loss"
    )
    p.add_argument("--queue-size", type=positive_int, default=65_536, help="negatives per queue")
    p.add_argument("--ema-momentum", type=below_one, default=0.999, help="key-encoder momentum")


def refusals(a):
    yield from pretrain.refusals(a)
    if a.queue_size < a.batch_pairs:
        yield f"--queue-size {a.queue_size} is smaller than one step's keys ({a.batch_pairs})"
    if a.dense_level >= a.num_levels:
        yield f"--dense-level {a.dense_level} outside the FPN's levels 0..{a.num_levels - 1}"


def preset(args):
    return pretrain.preset(args, {**pretrain.DEMO, **DEMO})


def parse_args(argv=None):
    p = pretrain.build_parser(add_arguments, description=__doc__.split("\n")[0])
    p.set_defaults(method="densecl", arch="balanced")
    return runtime.parse(p, argv, preset, refusals)


def main(args):
    return pretrain.main(args, build=build_model, step=densecl_step, after_step=momentum_update)


if __name__ == "__main__":
    runtime.cli(main, parse_args)
