"""The host class-prompt store: row-wise AdamW/SGD equal torch's per row, absent classes
do not move, AMP scaling and overflow, checkpoint state, and a Lightning run with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_config, tiny_overrides

from vpt_dml.errors import UserError
from vpt_dml.models.class_prompt_store import ClassPromptStore
from vpt_dml.models.semantic_proxies import SemanticProxies

COUNTS = [2, 0, 1]  # a layer without class prompts in the middle
C, D = 5, 4
BATCHES = [[0, 1, 1], [1, 2, 2], [0, 0, 1]]  # classes 3 and 4 never appear


def make_store(dtype=torch.float32) -> ClassPromptStore:
    g = torch.Generator().manual_seed(0)
    initial = [torch.randn(C, m, D, generator=g) for m in COUNTS if m > 0]
    return ClassPromptStore(initial, COUNTS, dtype)


def weights_for(step: int, labels: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(len(labels), m, D, generator=g) for m in COUNTS if m > 0]


def run_store(store: ClassPromptStore, group: dict, kind: str, scale: float = 1.0) -> None:
    for step, labels in enumerate(BATCHES):
        prompts = [p for p in store.gather(torch.tensor(labels)) if p is not None]
        loss = sum((p * w).sum() for p, w in zip(prompts, weights_for(step, labels)))
        (loss * scale).backward()
        assert store.step(group, kind, grad_scale=scale)


def reference_rows(store_initial: list[torch.Tensor], make_opt) -> list[torch.Tensor]:
    """One torch optimizer per class, stepped only when its class is in the batch."""
    params = {c: [t[c].clone().requires_grad_() for t in store_initial] for c in range(C)}
    opts = {c: make_opt(params[c]) for c in range(C)}
    for step, labels in enumerate(BATCHES):
        weights = weights_for(step, labels)
        for c in sorted(set(labels)):
            mask = torch.tensor(labels) == c
            for p, w in zip(params[c], weights):
                p.grad = w[mask].sum(0)
            opts[c].step()
    return [
        torch.stack([params[c][i].detach() for c in range(C)]) for i in range(len(store_initial))
    ]


@pytest.mark.parametrize(
    ("kind", "group", "make_opt"),
    [
        (
            "adamw",
            {"lr": 0.1, "weight_decay": 0.05, "betas": (0.9, 0.99), "eps": 1e-8},
            lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.05, betas=(0.9, 0.99)),
        ),
        (
            "sgd",
            {"lr": 0.1, "weight_decay": 0.05, "momentum": 0.9, "dampening": 0.0, "nesterov": False},
            lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.05, momentum=0.9),
        ),
    ],
)
def test_rowwise_update_equals_torch_per_row_and_absent_classes_stay(kind, group, make_opt):
    store = make_store()
    initial = [v.clone() for v in store.values]
    run_store(store, group, kind)
    expected = reference_rows(initial, make_opt)
    for got, want, init in zip(store.values, expected, initial):
        torch.testing.assert_close(got[:3], want[:3], rtol=1e-5, atol=1e-6)
        assert not torch.equal(got[:3], init[:3])
        assert torch.equal(got[3:], init[3:])  # no decay, no momentum drift
    for moments in store.moments.values():
        for m in moments:
            assert torch.count_nonzero(m[3:]) == 0
    assert store.steps.tolist() == [2, 3, 1, 0, 0]


def test_amp_scale_is_undone_and_overflow_skips():
    group = {"lr": 0.1, "weight_decay": 0.0}
    plain, scaled = make_store(), make_store()
    run_store(plain, group, "adamw")
    run_store(scaled, group, "adamw", scale=1024.0)
    for a, b in zip(plain.values, scaled.values):
        torch.testing.assert_close(a, b)

    before = [v.clone() for v in plain.values]
    prompts = [p for p in plain.gather(torch.tensor([0, 3])) if p is not None]
    (prompts[0].sum() * float("inf")).backward()
    assert not plain.step(group, "adamw")
    assert all(torch.equal(a, b) for a, b in zip(before, plain.values))
    assert plain.steps.tolist() == [2, 3, 1, 0, 0]
    # a step the main optimizer skipped (GradScaler overflow) is skipped here too
    prompts = [p for p in plain.gather(torch.tensor([4])) if p is not None]
    prompts[0].sum().backward()
    assert not plain.step(group, "adamw", skip=True)
    assert plain.steps[4] == 0


def test_bf16_storage_feeds_float32_rows():
    store = make_store(torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in store.values)
    rows = store.gather(torch.tensor([2, 4]))
    assert rows[0].dtype == torch.float32 and rows[1] is None
    torch.testing.assert_close(rows[0], store.values[0][[2, 4]].float(), rtol=0, atol=0)
    rows[0].sum().backward()
    assert store.step({"lr": 0.1}, "adamw")
    assert store.moments["exp_avg"][0].dtype == torch.bfloat16


def semantic(seed: int, store: str) -> SemanticProxies:
    torch.manual_seed(seed)
    return SemanticProxies(C, D, 3, COUNTS, class_prompt_store=store)


def test_host_store_starts_like_dense_table_and_round_trips_through_state_dict():
    dense, host = semantic(0, "device"), semantic(0, "host")
    for table, param in zip(host.class_prompts.store.values, dense.class_prompts.tokens):
        assert torch.equal(table, param.detach())
    assert not any("class_prompts" in n for n, _ in host.named_parameters())

    prompts = [p for p in host.class_prompts.gather(torch.tensor([1, 2])) if p is not None]
    sum(p.sum() for p in prompts).backward()
    host.class_prompts.store.step({"lr": 0.1}, "adamw")
    other = semantic(1, "host")
    other.load_state_dict(host.state_dict())
    a, b = host.class_prompts.store.state_tensors(), other.class_prompts.store.state_tensors()
    assert len(a) == len(b) == 2 + 4 + 1  # values, two moments per layer, step counts
    assert all(torch.equal(x, y) for x, y in zip(a, b))

    wrong = SemanticProxies(C, D, 3, [3, 0, 1], class_prompt_store="host")
    with pytest.raises(UserError, match="class_prompts"):
        wrong.load_state_dict(host.state_dict())


def test_lightning_run_steps_only_batch_rows_and_checkpoints_the_store(tmp_path: Path):
    from vpt_dml.module import VPTDMLModule
    from vpt_dml.run import train

    cfg = compose_config(
        tiny_overrides(
            "model.proxy.class_prompt_store=host",
            "model.proxy.class_prompts={num: 2, depth: 2, step: 0}",
            "eval_before_training=false",
            "optim.weight_decay=0.01",
        ),
        tmp_path,
    )
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = VPTDMLModule.load_from_checkpoint(ckpt, map_location="cpu")
    store = module.class_prompt_store
    # 4 train classes x 6 images, batches of 8 = 4 classes x 2: 3 steps, all classes each step
    assert store.steps.tolist() == [3, 3, 3, 3]
    assert set(store.moments) == {"exp_avg", "exp_avg_sq"}
    assert all(torch.count_nonzero(m) > 0 for m in store.moments["exp_avg"])
