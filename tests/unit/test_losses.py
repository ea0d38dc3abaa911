"""Proxy Anchor / ProxyNCA with external proxies against pytorch-metric-learning and
brute-force float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vpt_dml.errors import UserError
from vpt_dml.losses import ProxyAnchorLoss, ProxyNCALoss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def _inputs(seed: int = 0, batch: int = 10, classes: int = 7, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    # classes 5 and 6 never appear: they are negatives only
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 1, 0])[:batch]
    proxies = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    return emb, labels, proxies


def _brute_force(emb, labels, proxies, alpha, delta, z_pos):
    """The formula of METHOD.md §2, loop by loop."""
    emb = F.normalize(emb, dim=-1)
    prox = F.normalize(proxies, dim=-1)
    pos, neg = 0.0, 0.0
    for c in range(len(prox)):
        sims = [float(emb[i] @ prox[c]) for i in range(len(emb))]
        p = [s for s, y in zip(sims, labels.tolist()) if y == c]
        n = [s for s, y in zip(sims, labels.tolist()) if y != c]
        if p:
            pos += math.log(1 + sum(math.exp(-alpha * (s - delta)) for s in p))
        neg += math.log(1 + sum(math.exp(alpha * (s + delta)) for s in n))
    present = len(set(labels.tolist()))
    return pos / (present if z_pos == "present" else len(prox)) + neg / len(prox)


def test_present_equals_pml_value_and_gradients():
    emb, labels, proxies = _inputs()
    ours_emb = emb.clone().requires_grad_(True)
    ours_prox = proxies.clone().requires_grad_(True)
    ours = ProxyAnchorLoss(alpha=32.0, delta=0.1, positive_normalization="present")
    loss = ours(ours_emb, labels, ours_prox)
    loss.backward()

    ref = pml_losses.ProxyAnchorLoss(num_classes=7, embedding_size=6, margin=0.1, alpha=32).double()
    with torch.no_grad():
        ref.proxies.copy_(proxies)
    ref_emb = emb.clone().requires_grad_(True)
    ref_loss = ref(ref_emb, labels)
    ref_loss.backward()

    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10)  # float64
    torch.testing.assert_close(ours_emb.grad, ref_emb.grad, rtol=1e-9, atol=1e-12)  # float64
    torch.testing.assert_close(ours_prox.grad, ref.proxies.grad, rtol=1e-9, atol=1e-12)  # float64


@pytest.mark.parametrize("z_pos", ["present", "all"])
def test_matches_brute_force(z_pos):
    emb, labels, proxies = _inputs(seed=1)
    loss = ProxyAnchorLoss(alpha=32.0, delta=0.1, positive_normalization=z_pos)(
        emb, labels, proxies
    )
    assert loss.item() == pytest.approx(  # float64
        _brute_force(emb, labels, proxies, 32.0, 0.1, z_pos), rel=1e-9
    )


def test_in_batch_uses_only_the_batch_classes():
    emb, labels, proxies = _inputs(seed=3)
    got = ProxyAnchorLoss(proxy_range="in_batch", positive_normalization="all")(
        emb, labels, proxies
    )
    classes = torch.unique(labels)
    relabelled = torch.searchsorted(classes, labels)
    want = _brute_force(emb, relabelled, proxies[classes], 32.0, 0.1, "all")
    assert got.item() == pytest.approx(want, rel=1e-9)  # float64


def test_proxy_nca_equals_pml_with_squared_scale():
    emb, labels, proxies = _inputs(seed=4)
    ours_emb = emb.clone().requires_grad_(True)
    loss = ProxyNCALoss(scale=3.0)(ours_emb, labels, proxies)
    loss.backward()
    ref = pml_losses.ProxyNCALoss(num_classes=7, embedding_size=6, softmax_scale=9.0).double()
    with torch.no_grad():
        ref.proxies.copy_(proxies)
    ref_emb = emb.clone().requires_grad_(True)
    ref_loss = ref(ref_emb, labels)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-9)  # float64
    torch.testing.assert_close(ours_emb.grad, ref_emb.grad, rtol=1e-8, atol=1e-12)  # float64


@pytest.mark.parametrize("kwargs", [{"positive_normalization": "mean"}, {"proxy_range": "batch"}])
def test_bad_options_are_user_errors(kwargs):
    with pytest.raises(UserError, match="loss\\."):
        ProxyAnchorLoss(**kwargs)
