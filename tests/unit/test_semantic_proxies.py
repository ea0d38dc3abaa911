"""VPTSP(-G) maths against hand-written references (METHOD.md §1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tolerances import close

from vpt_dml.models.semantic_proxies import (
    ClassPrompts,
    GatedUpdate,
    SemanticProxies,
    fold_gru,
    fold_mix,
)

E = 5


def _blocks(linear: nn.Linear):
    """(r, z, n) weight and bias blocks of a GRUCell-layout Linear."""
    w = linear.weight.chunk(3, dim=0)
    b = linear.bias.chunk(3) if linear.bias is not None else (0.0, 0.0, 0.0)
    return w, b


def reference_gru(s, h, cell: GatedUpdate, act):
    """z, r, n exactly as METHOD.md writes them, from the cell's blocks."""
    (wir, wiz, win), (bir, biz, bin_) = _blocks(cell.input)
    (whr, whz, whn), (bhr, bhz, bhn) = _blocks(cell.hidden)
    z = torch.sigmoid(s @ wiz.T + h @ whz.T + biz + bhz)
    r = torch.sigmoid(s @ wir.T + h @ whr.T + bir + bhr)
    n = act(s @ win.T + bin_ + r * (h @ whn.T + bhn))
    return (1 - z) * n + z * h


def _cell(activation: str, hidden_bias: bool = False, seed: int = 0) -> GatedUpdate:
    torch.manual_seed(seed)
    cell = GatedUpdate(E, activation, hidden_bias=hidden_bias).double()
    with torch.no_grad():  # non-zero biases so that their placement is tested
        for p in cell.parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    return cell


@pytest.mark.parametrize("hidden_bias", [True, False])
def test_tanh_cell_equals_torch_grucell(hidden_bias):
    cell = _cell("tanh", hidden_bias)
    ref = nn.GRUCell(E, E).double()
    with torch.no_grad():
        ref.weight_ih.copy_(cell.input.weight)
        ref.bias_ih.copy_(cell.input.bias)
        ref.weight_hh.copy_(cell.hidden.weight)
        ref.bias_hh.copy_(cell.hidden.bias if hidden_bias else torch.zeros(3 * E))
    s, h = torch.randn(4, E, dtype=torch.float64), torch.randn(4, E, dtype=torch.float64)
    torch.testing.assert_close(cell(s, h), ref(s, h), rtol=0, atol=1e-14)  # float64


@pytest.mark.parametrize("activation,act", [("relu", torch.relu), ("tanh", torch.tanh)])
def test_cell_equals_method_formula(activation, act):
    cell = _cell(activation)
    s, h = torch.randn(3, E, dtype=torch.float64), torch.randn(3, E, dtype=torch.float64)
    torch.testing.assert_close(
        cell(s, h), reference_gru(s, h, cell, act), rtol=1e-7, atol=1e-7
    )  # float64


def test_cell_init_is_the_reference_one():
    torch.manual_seed(0)
    cell = GatedUpdate(64)
    bound = (6 / (64 + 64)) ** 0.5  # xavier-uniform of one (E, E) block
    for linear in (cell.input, cell.hidden):
        assert linear.weight.abs().max() <= bound
        assert linear.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(cell.input.bias) == 0
    assert cell.hidden.bias is None  # one bias per gate, none inside r * (W_hn h)


class Doubling(nn.Module):
    """A stand-in for dropout that shows where (and how often) it is applied."""

    def forward(self, x):
        return 2 * x


def hand_fold_gru(memory, s, labels, cell, dropout):
    memory = memory.clone()
    for c in sorted(set(labels.tolist())):
        h = memory[c]
        for i in range(len(labels)):  # batch order within the class
            if labels[i] == c:
                h = dropout(cell(s[i : i + 1], h[None]))[0]
        memory[c] = h
    return F.normalize(memory, dim=-1)


@pytest.mark.parametrize("labels", [[3, 1, 3, 0, 1, 3], [2, 2, 0, 0], [4, 0, 1]])
def test_fold_gru_equals_sequential_reference(labels):
    labels = torch.tensor(labels)
    cell = _cell("relu", seed=1)
    memory = F.normalize(torch.randn(6, E, dtype=torch.float64), dim=-1)
    s = F.normalize(torch.randn(len(labels), E, dtype=torch.float64), dim=-1)
    got = fold_gru(memory, s, labels, cell, Doubling())
    want = hand_fold_gru(memory, s, labels, cell, Doubling())
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)  # float64
    # order matters: swapping two samples of class 3 changes H[3]
    if labels.tolist()[:3] == [3, 1, 3]:
        swapped = s.clone()
        swapped[[0, 2]] = s[[2, 0]]
        assert not torch.allclose(
            fold_gru(memory, swapped, labels, cell, Doubling())[3], got[3], rtol=1e-5, atol=1e-8
        )


def test_fold_mix_equals_reference():
    labels = torch.tensor([1, 1, 0, 1, 3])
    memory = F.normalize(torch.randn(4, E, dtype=torch.float64), dim=-1)
    s = torch.randn(5, E, dtype=torch.float64)
    want = memory.clone()
    for c in (0, 1, 3):
        want[c] = 0.8 * memory[c] + 0.2 * s[labels == c].mean(0)
    torch.testing.assert_close(
        fold_mix(memory, s, labels, 0.8), F.normalize(want, dim=-1), rtol=1e-7, atol=1e-7
    )  # float64


def test_gradient_reaches_only_the_updated_rows():
    labels = torch.tensor([0, 2, 2])
    cell = _cell("relu")
    memory = F.normalize(torch.randn(4, E, dtype=torch.float64), dim=-1)
    s = torch.randn(3, E, dtype=torch.float64, requires_grad=True)
    new = fold_gru(memory, s, labels, cell, nn.Identity())
    assert new[1].grad_fn is not None  # re-normalised, but ...
    (grad,) = torch.autograd.grad(new[[1, 3]].sum(), s, allow_unused=True, retain_graph=True)
    assert grad is None or torch.count_nonzero(grad) == 0  # ... rows 1, 3 depend on no s
    (grad,) = torch.autograd.grad(new[2].sum(), s)
    assert torch.count_nonzero(grad[1:]) > 0 and torch.count_nonzero(grad[0]) == 0


class FakeBackbone(nn.Module):
    """(images, prompts) -> feature: the mean of each sample's class prompts plus the image."""

    def forward(self, images, prompts=None):
        first = next(p for p in prompts if p is not None)
        return images + first.mean(dim=1)


def _proxies(update="gru_relu", classes=6, dim=8, ratio=0.3):
    torch.manual_seed(0)
    return SemanticProxies(classes, dim, E, [2, 1, 0], update=update, bias_ratio=ratio)


def test_forward_updates_memory_and_combines_with_bias():
    sp = _proxies()
    before = sp.memory.clone()
    images, labels = torch.randn(4, 8), torch.tensor([1, 1, 4, 0])
    out = sp(images, labels, FakeBackbone())
    s = sp.head(FakeBackbone()(images, sp.class_prompts.gather(labels)))
    want_memory = hand_fold_gru(before, s.detach(), labels, sp.cell, nn.Identity())
    torch.testing.assert_close(sp.memory, want_memory, **close(torch.float32))
    torch.testing.assert_close(
        out, F.normalize(0.3 * sp.bias + 0.7 * want_memory, dim=-1), **close(torch.float32)
    )
    untouched = [2, 3, 5]
    torch.testing.assert_close(sp.memory[untouched], before[untouched], **close(torch.float32))
    sp.eval()
    frozen = sp.memory.clone()
    sp(images, labels, FakeBackbone())
    assert torch.equal(sp.memory, frozen)  # evaluation never moves H


def test_class_prompts_per_layer_counts_and_gather():
    cp = ClassPrompts(5, [3, 1, 0, 2], 4)
    labels = torch.tensor([4, 0, 4])
    out = cp.gather(labels)
    assert [None if t is None else tuple(t.shape) for t in out] == [
        (3, 3, 4),
        (3, 1, 4),
        None,
        (3, 2, 4),
    ]
    assert torch.equal(out[0][0], out[0][2]) and not torch.equal(out[0][0], out[0][1])


def test_initial_state_follows_the_reference():
    classes, dim = 200, 64
    sp = SemanticProxies(classes, 32, dim, [3], update="gru_relu")
    bound = (6 / (classes + dim)) ** 0.5 / 8  # xavier-uniform / 8
    assert sp.bias.abs().max() <= bound and sp.bias.abs().max() > 0.9 * bound
    torch.testing.assert_close(sp.memory.norm(dim=-1), torch.ones(classes), **close(torch.float32))
    # class prompts: xavier-normal of a (C, M, D) tensor -> std sqrt(2 / ((M + C) * D))
    std = sp.class_prompts.tokens[0].std().item()
    assert std == pytest.approx((2 / ((3 + classes) * 32)) ** 0.5, rel=0.05)


def test_memory_survives_state_dict_round_trip(tmp_path):
    sp = _proxies()
    sp(torch.randn(4, 8), torch.tensor([1, 1, 4, 0]), FakeBackbone())
    assert "memory" in sp.state_dict()
    torch.save(sp.state_dict(), tmp_path / "sp.pt")
    fresh = _proxies()
    fresh.memory.zero_()
    fresh.load_state_dict(torch.load(tmp_path / "sp.pt"))
    assert torch.equal(fresh.memory, sp.memory)


def _hand_in_batch_loss(emb, labels, proxies, alpha=32.0, delta=0.1):
    """Proxy Anchor over the given per-class proxies (rows in sorted class order), Z+ = K."""
    classes = sorted(set(labels.tolist()))
    emb = F.normalize(emb, dim=-1)
    total = 0.0
    for j, c in enumerate(classes):
        cos = emb @ proxies[j]
        pos, neg = labels == c, labels != c
        total = total + torch.log1p(torch.exp(-alpha * (cos[pos] - delta)).sum())
        total = total + torch.log1p(torch.exp(alpha * (cos[neg] + delta)).sum())
    return total / len(classes)


@pytest.mark.parametrize("update", ["gru_relu", "mix"])
def test_in_batch_proxies_use_the_fold_output_before_normalisation(update):
    """The reference's in_batch: normalize(r * B[c] + (1 - r) * h_c), h_c not normalised;
    `all` keeps using the row-normalised H; H is updated the same way in both."""
    from vpt_dml.losses import ProxyAnchorLoss

    r, lam = 0.3, 0.8
    models = {}
    for in_batch in (False, True):
        torch.manual_seed(0)
        models[in_batch] = SemanticProxies(
            6, 8, E, [2, 1, 0], update=update, bias_ratio=r, in_batch_proxies=in_batch
        ).double()
    with torch.no_grad():  # non-zero gate biases, and a bias B that matters
        for sp in models.values():
            torch.manual_seed(1)
            if sp.cell is not None:
                sp.cell.input.bias.uniform_(-0.5, 0.5)
            sp.bias.normal_()
            sp.memory.copy_(F.normalize(sp.memory, dim=-1))  # unit rows in float64 too
    sp_all, sp_in = models[False], models[True]
    memory0 = sp_all.memory.clone()
    labels = torch.tensor([1, 1, 4, 0, 4, 1])
    torch.manual_seed(2)
    s = torch.randn(len(labels), E, dtype=torch.float64)

    # hand computation of each batch class's h_c (batch order within the class)
    h = {}
    for c in sorted(set(labels.tolist())):
        if update == "mix":
            h[c] = lam * memory0[c] + (1 - lam) * s[labels == c].mean(0)
        else:
            hc = memory0[c][None]
            for i in range(len(labels)):
                if labels[i] == c:
                    hc = reference_gru(s[i : i + 1], hc, sp_all.cell, torch.relu)
            h[c] = hc[0]
    classes = sorted(h)
    assert all(abs(float(h[c].norm()) - 1) > 1e-3 for c in classes)  # the case that matters
    new_memory = memory0.clone()
    for c in classes:
        new_memory[c] = F.normalize(h[c], dim=0)

    out_all = sp_all.proxies_from(s, labels)
    out_in = sp_in.proxies_from(s, labels)
    B = sp_all.bias.detach()
    want_all = F.normalize(r * B + (1 - r) * new_memory, dim=-1)
    want_in = want_all.clone()
    for c in classes:
        want_in[c] = F.normalize(r * B[c] + (1 - r) * h[c], dim=0)
    torch.testing.assert_close(
        out_all, want_all, rtol=1e-12, atol=1e-12
    )  # float64; `all` unchanged
    torch.testing.assert_close(out_in, want_in, rtol=1e-12, atol=1e-12)  # float64
    assert not torch.allclose(out_in[classes], out_all[classes], rtol=1e-5, atol=1e-6)
    for sp in (sp_all, sp_in):  # H itself: the normalised rows in both
        torch.testing.assert_close(sp.memory, new_memory, rtol=1e-12, atol=1e-12)  # float64

    # through the loss's in_batch range: the reference's value and B's gradient
    emb = torch.randn(len(labels), E, dtype=torch.float64)
    for sp in (sp_all, sp_in):
        sp.memory.copy_(memory0)
    loss = ProxyAnchorLoss(positive_normalization="all", proxy_range="in_batch")(
        emb, labels, sp_in.proxies_from(s, labels)
    )
    (grad_b,) = torch.autograd.grad(loss, sp_in.bias)
    bias = sp_in.bias
    hand_proxies = torch.stack([F.normalize(r * bias[c] + (1 - r) * h[c], dim=0) for c in classes])
    hand = _hand_in_batch_loss(emb, labels, hand_proxies)
    (hand_grad_b,) = torch.autograd.grad(hand, bias)
    assert loss.item() == pytest.approx(hand.item(), rel=1e-12)  # float64
    torch.testing.assert_close(grad_b, hand_grad_b, rtol=1e-10, atol=1e-12)  # float64
    assert torch.count_nonzero(grad_b[[2, 3, 5]]) == 0  # only the batch classes' B rows
