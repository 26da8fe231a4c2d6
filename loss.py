"""Losses of Sec. 2.3 (Kats et al. 2024), and the downstream segmentation loss and metric (3.2).

  info_nce             Eq. 1: InfoNCE over the n sampled voxel pairs of a batch, tau = 0.1.
  reconstruction_loss  Eq. 2: MSE between the reconstructed and the un-augmented patches.
  hybrid_loss          Eq. 3: L = L_c + lambda * L_r, lambda = 10.
  segmentation_loss    softmax cross-entropy + soft Dice (fine-tuning; the reference: sigmoids).
  predict_labels       the K class scores read as one label map (argmax).
  dice_per_class       Dice per foreground class of a label map (the reported metric).

Shapes: sampled voxel embeddings (N, D); volumes (B, C, X, Y, Z); label maps (B, X, Y, Z) or
(X, Y, Z), int, 0 = background. Eq. 1 is a sum over anchors; it is averaged here over all 2n
anchors, so the loss scale, and with it the useful learning rate, does not depend on n. Every loss
is computed in float32 (float64 for float64 inputs), also under autocast.
"""
import numpy as np
import torch
import torch.nn.functional as F


def _at_least_float32(*tensors):
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


def info_nce(z_a, z_b, temperature=0.1, valid=None):
    """Eq. 1. z_a, z_b: (N, D) L2-normalised embeddings; row i of both is the same voxel.
    valid: optional (N,) bool; rows marked False are padding (pretrain.py pads each process's
    voxels to a fixed count before gathering them across processes): they are neither anchors
    nor negatives. A mask instead of boolean indexing keeps the shapes static (no host sync).

    Each of the 2N voxels is an anchor; its positive is its twin in the other view, its negatives
    are the other 2(N - 1) sampled voxels of both views (the anchor itself is excluded). Returns
    the mean over the 2N anchors of -log softmax(positive). Memory: the (2N, 2N) float32 logits
    take 16 N^2 bytes, about 1.7 GB at the paper's N = 10 x 1024 voxels (plus as much for the
    gradient).
    """
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(f"loss.py: info_nce needs two (N, D) tensors of one shape, got "
                         f"{tuple(z_a.shape)} and {tuple(z_b.shape)}")
    n = z_a.shape[0]
    with torch.autocast(device_type=z_a.device.type, enabled=False):  # fp16 logits / tau overflow
        z = torch.cat(_at_least_float32(z_a, z_b))  # (2N, D): views A then B
        logits = z @ z.T / temperature  # (2N, 2N)
        self_pair = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_pair, float("-inf"))
        target = (torch.arange(2 * n, device=z.device) + n) % (2 * n)  # A_i <-> B_i
        if valid is None:
            return F.cross_entropy(logits, target)
        keep = torch.cat([valid, valid])  # (2N,)
        logits = logits.masked_fill(~keep[None, :], float("-inf"))
        losses = F.cross_entropy(logits.masked_fill(~keep[:, None], 0.0), target, reduction="none")
        return (losses * keep).sum() / keep.sum().clamp(min=1)


def reconstruction_loss(recon_a, target_a, recon_b, target_b):
    """Eq. 2: the two views' mean MSE. recon_*, target_* (un-augmented patches): (B, 1, X, Y, Z)."""
    if recon_a.shape != target_a.shape or recon_b.shape != target_b.shape:
        raise ValueError(f"loss.py: reconstruction and target shapes differ: "
                         f"{tuple(recon_a.shape)} vs {tuple(target_a.shape)}, "
                         f"{tuple(recon_b.shape)} vs {tuple(target_b.shape)}")
    recon_a, target_a, recon_b, target_b = _at_least_float32(recon_a, target_a, recon_b, target_b)
    return (F.mse_loss(recon_a, target_a) + F.mse_loss(recon_b, target_b)) / 2


def hybrid_loss(l_c, l_r, recon_weight=10.0, contrastive_weight=1.0):
    """Eq. 3: L = L_c + lambda * L_r with lambda = recon_weight = 10 (scalars in, scalar out)."""
    return contrastive_weight * l_c + recon_weight * l_r


def segmentation_loss(logits, label, eps=1e-5):
    """Softmax cross-entropy + soft Dice over the foreground classes (nnU-Net's loss).

    logits: (B, K, X, Y, Z), channel 0 = background, channel c = class c; label: (B, X, Y, Z)
    int64 in [0, K). Dice loss = 1 - mean over foreground classes of
    (2 sum pg + eps) / (sum p + sum g + eps), sums over the batch and space, p = softmax(logits).

    Deviation from the reference (per-class sigmoid BCE + soft Dice, K - 1 outputs): with K - 1
    sigmoids each foreground class fights ~100x more background voxels alone and small classes
    can die at the start; a softmax shares one background channel (docs/history.md has the
    measurements).
    """
    if logits.ndim != label.ndim + 1 or logits.shape[:1] + logits.shape[2:] != label.shape:
        raise ValueError(f"loss.py: logits (B, K, X, Y, Z) and label (B, X, Y, Z) do not match: "
                         f"{tuple(logits.shape)} vs {tuple(label.shape)}")
    (logits,) = _at_least_float32(logits)
    num_classes = logits.shape[1]
    ce = F.cross_entropy(logits, label)
    prob = torch.softmax(logits, dim=1)
    target = F.one_hot(label, num_classes).movedim(-1, 1).to(prob.dtype)  # (B, K, X, Y, Z)
    dims = [0] + list(range(2, logits.ndim))  # batch and space
    dice = (2 * (prob * target).sum(dims) + eps) / (prob.sum(dims) + target.sum(dims) + eps)  # (K,)
    return ce + 1 - dice[1:].mean()


def predict_labels(scores):
    """The label map of class scores (logits or probabilities): (B, K, ...) -> (B, ...) int64."""
    return scores.argmax(dim=1)


def dice_per_class(pred, label, num_classes):
    """Dice of each foreground class. pred, label: (X, Y, Z) int (numpy or torch); num_classes
    counts the background. Returns (num_classes - 1,) float64, class c at index c - 1; NaN for a
    class absent from both pred and label (average with np.nanmean to ignore it)."""
    pred, label = [np.asarray(a.detach().cpu() if torch.is_tensor(a) else a) for a in (pred, label)]
    if pred.shape != label.shape:
        raise ValueError(f"loss.py: dice_per_class got pred {pred.shape} and label {label.shape}")
    for name, a in (("pred", pred), ("label", label)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"loss.py: {name} values must be in [0, {num_classes}), got "
                             f"[{a.min()}, {a.max()}]")
    # Confusion matrix in one pass: rows = label, columns = prediction.
    pair = label.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    confusion = np.bincount(pair, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    overlap = np.diag(confusion)[1:].astype(np.float64)
    total = (confusion.sum(0) + confusion.sum(1))[1:].astype(np.float64)  # |pred = c| + |label = c|
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * overlap / total, np.nan)
