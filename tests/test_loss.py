"""loss.py against naive implementations: Eq. 1 as a loop, autograd, hand computations."""

import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import loss  # noqa: E402


def random_embeddings(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z_a = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    z_b = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    return z_a, z_b


def naive_eq1_terms(z_a, z_b, tau):
    """-log terms of Eq. 1 for every anchor of view A then view B, written as in the paper."""
    n = z_a.shape[0]
    views = {"A": z_a.double(), "B": z_b.double()}
    d = lambda u, v: math.exp(float(u @ v) / tau)  # noqa: E731
    terms = []
    for k, other in (("A", "B"), ("B", "A")):
        for i in range(n):
            anchor = views[k][i]
            positive = d(anchor, views[other][i])
            negatives = sum(d(anchor, views[l][j]) for j in range(n) if j != i for l in ("A", "B"))
            terms.append(-math.log(positive / (positive + negatives)))
    return terms


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_info_nce_matches_eq1_loop(tau):
    z_a, z_b = random_embeddings(7, 5, seed=0)
    terms = naive_eq1_terms(z_a, z_b, tau)
    value = loss.info_nce(z_a, z_b, temperature=tau).item()
    assert value == pytest.approx(np.mean(terms), rel=1e-5)
    # The paper's sum form is the same up to the factor 1 / (2N).
    assert value * 2 * len(z_a) == pytest.approx(np.sum(terms), rel=1e-5)


def test_info_nce_lower_for_matched_views():
    g = torch.Generator().manual_seed(1)
    z_a, _ = random_embeddings(64, 16, seed=2)
    z_b = F.normalize(z_a + 0.05 * torch.randn(z_a.shape, generator=g), dim=1)
    shuffled = z_b[torch.randperm(len(z_b), generator=g)]
    assert loss.info_nce(z_a, z_b) < loss.info_nce(z_a, shuffled)


def test_info_nce_gradcheck():
    z_a, z_b = random_embeddings(4, 3, seed=3, dtype=torch.float64)
    z_a.requires_grad_(True)
    z_b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: loss.info_nce(a, b, temperature=0.5), (z_a, z_b))


def test_info_nce_rejects_mismatched_views():
    with pytest.raises(ValueError, match="loss.py"):
        loss.info_nce(torch.zeros(4, 3), torch.zeros(5, 3))


def test_reconstruction_and_hybrid_by_hand():
    recon_a = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 4, 1, 1)
    target_a = torch.tensor([1.0, 1.0, 0.0, 3.0]).view(
        1, 1, 4, 1, 1
    )  # squared errors 1, 0, 4, 0 -> 1.25
    recon_b = torch.full((1, 1, 2, 1, 1), 0.5)
    target_b = torch.zeros(1, 1, 2, 1, 1)  # squared errors 0.25, 0.25 -> 0.25
    l_r = loss.reconstruction_loss(recon_a, target_a, recon_b, target_b)
    assert l_r.item() == pytest.approx((1.25 + 0.25) / 2)
    assert loss.hybrid_loss(torch.tensor(2.0), l_r).item() == pytest.approx(2.0 + 10 * 0.75)
    assert loss.hybrid_loss(2.0, 0.75, recon_weight=3.0, contrastive_weight=0.5) == pytest.approx(
        1.0 + 2.25
    )


def naive_segmentation_loss(logits, label, eps=1e-5):
    """Softmax cross-entropy (mean over voxels) + 1 - mean foreground soft Dice, by loops."""
    x = logits.double()
    B, K = x.shape[:2]
    p = torch.softmax(x, dim=1)
    ce = 0.0
    for b in range(B):
        for idx in np.ndindex(*label.shape[1:]):
            ce -= math.log(p[(b, label[(b,) + idx].item()) + idx].item())
    dice = []
    for c in range(1, K):
        g = (label == c).double()
        dice.append(
            (2 * (p[:, c] * g).sum().item() + eps) / (p[:, c].sum().item() + g.sum().item() + eps)
        )
    return ce / label.numel() + 1 - np.mean(dice)


def test_segmentation_loss_matches_naive():
    g = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(2, 4, 5, 4, 3, generator=g)
    label = torch.randint(0, 4, (2, 5, 4, 3), generator=g)
    label[label == 3] = 0  # class 3 absent from the batch: its Dice term is (eps) / (sum p + eps)
    expected = naive_segmentation_loss(logits, label)
    assert loss.segmentation_loss(logits, label).item() == pytest.approx(expected, rel=1e-5)


def test_segmentation_loss_near_zero_for_confident_perfect_logits():
    g = torch.Generator().manual_seed(5)
    label = torch.randint(0, 3, (2, 6, 5, 4), generator=g)
    one_hot = torch.stack([label == c for c in (0, 1, 2)], dim=1).float()  # (B, K, X, Y, Z)
    logits = 30 * (2 * one_hot - 1)
    assert loss.segmentation_loss(logits, label).item() < 1e-6
    assert torch.equal(loss.predict_labels(logits), label)


def test_predict_labels_by_hand():
    scores = torch.tensor(
        [[2.0, -1.0, -2.0], [0.0, 0.5, 2.0], [0.1, 3.0, 1.0], [0.3, -0.1, 0.2]]
    ).T[None]  # (1, K=3, 4)
    assert loss.predict_labels(scores).tolist() == [[0, 2, 1, 0]]


def test_dice_per_class_by_hand():
    label = np.array([[0, 1, 1, 2], [0, 1, 0, 2]])
    pred = np.array([[0, 1, 0, 2], [4, 1, 4, 0]])
    # class 1: pred 2 voxels, label 3, overlap 2 -> 4/5; class 2: pred 1, label 2, overlap 1 -> 2/3;
    # class 3: absent from both -> NaN; class 4: only in pred -> 0.
    dice = loss.dice_per_class(pred, label, num_classes=5)
    assert dice.shape == (4,) and dice.dtype == np.float64
    np.testing.assert_allclose(dice[[0, 1, 3]], [4 / 5, 2 / 3, 0.0])
    assert np.isnan(dice[2])
    torch_dice = loss.dice_per_class(torch.from_numpy(pred), torch.from_numpy(label), num_classes=5)
    np.testing.assert_array_equal(torch_dice, dice)


def test_dice_per_class_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="loss.py"):
        loss.dice_per_class(np.array([0, 5]), np.array([0, 1]), num_classes=3)


def test_info_nce_padding_mask_equals_dropping_the_rows():
    """pretrain.py pads each process's voxels before gathering: the mask makes padding invisible."""
    g = torch.Generator().manual_seed(3)
    za = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    zb = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    valid = torch.tensor([1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    masked = loss.info_nce(za, zb, 0.1, valid)
    dropped = loss.info_nce(za[valid], zb[valid], 0.1)
    torch.testing.assert_close(masked, dropped)
