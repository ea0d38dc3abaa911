"""The host class-prompt store: row-wise AdamW/SGD equal torch's per row, absent classes
do not move, AMP scaling and overflow, checkpoint state, and a Lightning run with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_config, tiny_overrides
from tolerances import EXACT, close

from vpt_dml.errors import UserError
from vpt_dml.models.class_prompt_store import ClassPromptStore
from vpt_dml.models.semantic_proxies import SemanticProxies

COUNTS = [2, 0, 1]  # a layer without class prompts in the middle
C, D = 5, 4
BATCHES = [[0, 1, 1], [1, 2, 2], [0, 0, 1]]  # classes 3 and 4 never appear


def make_store(dtype=torch.float32, step_count: str = "per_row") -> ClassPromptStore:
    g = torch.Generator().manual_seed(0)
    initial = [torch.randn(C, m, D, generator=g) for m in COUNTS if m > 0]
    return ClassPromptStore(initial, COUNTS, dtype, step_count)


def weights_for(step: int, labels: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(len(labels), m, D, generator=g) for m in COUNTS if m > 0]


def run_store(
    store: ClassPromptStore, group: dict, kind: str, scale: float = 1.0, batches=BATCHES
) -> None:
    for step, labels in enumerate(batches):
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
        torch.testing.assert_close(a, b, **close(torch.float32))

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
    assert len(a) == len(b) == 2 + 4 + 2  # values, two moments per layer, global + row counts
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert int(other.class_prompts.store.global_steps) == 1

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


# overlapping and disjoint classes; class 3 first appears at the third step, 4 never
GLOBAL_BATCHES = [[0, 1, 1], [1, 2, 2], [3, 3], [0, 0, 1], [2, 3], [1, 3, 3]]
ADAMW = {"lr": 0.1, "weight_decay": 0.05, "betas": (0.9, 0.99), "eps": 1e-8}


def reference_global_bank(initial: list[torch.Tensor]):
    """The reference's bank: per layer one torch AdamW whose single parameter is replaced by
    the batch's rows every step, its moments taken from (and returned to) the host table
    and its state's step carried over from the previous batch."""
    tables = [t.clone() for t in initial]
    exp_avg = [torch.zeros_like(t) for t in tables]
    exp_avg_sq = [torch.zeros_like(t) for t in tables]
    step = [torch.tensor(0.0) for _ in tables]
    for k, labels in enumerate(GLOBAL_BATCHES):
        ids = torch.tensor(sorted(set(labels)))
        where = torch.searchsorted(ids, torch.tensor(labels))
        for i, w in enumerate(weights_for(k, labels)):
            param = torch.nn.Parameter(tables[i][ids].clone())
            opt = torch.optim.AdamW([param], lr=0.1, weight_decay=0.05, betas=(0.9, 0.99))
            opt.state[param] = {
                "step": step[i].clone(),
                "exp_avg": exp_avg[i][ids].clone(),
                "exp_avg_sq": exp_avg_sq[i][ids].clone(),
            }
            param.grad = torch.zeros_like(param).index_add_(0, where, w)
            opt.step()
            state = opt.state[param]
            step[i] = state["step"]
            tables[i][ids] = param.detach()
            exp_avg[i][ids] = state["exp_avg"]
            exp_avg_sq[i][ids] = state["exp_avg_sq"]
    return tables, exp_avg, exp_avg_sq, step


def test_global_step_equals_adamw_on_the_batch_rows_with_carried_step():
    store = make_store(step_count="global")
    initial = [v.clone() for v in store.values]
    run_store(store, ADAMW, "adamw", batches=GLOBAL_BATCHES)
    tables, exp_avg, exp_avg_sq, step = reference_global_bank(initial)
    assert [int(s) for s in step] == [len(GLOBAL_BATCHES)] * 2
    assert int(store.global_steps) == len(GLOBAL_BATCHES)
    for i in range(len(tables)):
        torch.testing.assert_close(store.values[i], tables[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(store.moments["exp_avg"][i], exp_avg[i], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            store.moments["exp_avg_sq"][i], exp_avg_sq[i], rtol=1e-5, atol=1e-9
        )
        assert torch.equal(store.values[i][4], initial[i][4])  # never in a batch: untouched
    assert store.steps.tolist() == [2, 4, 2, 3, 0]  # per-row counts are still kept

    # the modes differ where a class first appears late (class 3: global t=3, per-row t=1)
    per_row = make_store(step_count="per_row")
    run_store(per_row, ADAMW, "adamw", batches=GLOBAL_BATCHES)
    assert not torch.allclose(per_row.values[0][3], store.values[0][3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        per_row.values[0][4], store.values[0][4], **EXACT
    )  # row 4: never in a batch


def test_global_step_skips_with_the_main_optimizer_and_round_trips():
    store = make_store(step_count="global")
    run_store(store, ADAMW, "adamw", batches=GLOBAL_BATCHES[:2])
    prompts = [p for p in store.gather(torch.tensor([0, 3])) if p is not None]
    (prompts[0].sum() * float("inf")).backward()
    assert not store.step(ADAMW, "adamw")  # overflow: no step, no count
    prompts = [p for p in store.gather(torch.tensor([4])) if p is not None]
    prompts[0].sum().backward()
    assert not store.step(ADAMW, "adamw", skip=True)  # the GradScaler skipped the step
    assert int(store.global_steps) == 2

    fresh = make_store(step_count="global")
    fresh.set_extra_state(store.get_extra_state())
    assert int(fresh.global_steps) == 2
    # a checkpoint from before the global count: continue from the most-stepped row
    old = dict(store.get_extra_state())
    del old["global_steps"]
    older = make_store(step_count="global")
    older.set_extra_state(old)
    assert int(older.global_steps) == int(store.steps.max()) == 2

    # the continued run equals one that never stopped
    rest = GLOBAL_BATCHES[2:]
    for s in (store, fresh):
        for k, labels in enumerate(rest, start=2):
            prompts = [p for p in s.gather(torch.tensor(labels)) if p is not None]
            sum((p * w).sum() for p, w in zip(prompts, weights_for(k, labels))).backward()
            assert s.step(ADAMW, "adamw")
    for a, b in zip(store.state_tensors(), fresh.state_tensors()):
        assert torch.equal(a, b)


def test_step_count_option_reaches_the_host_store_and_is_checked():
    sp = SemanticProxies(C, D, 3, COUNTS, class_prompt_store="host", class_prompt_step="global")
    store = sp.class_prompts.store
    initial = [v.clone() for v in store.values]
    run_store(store, ADAMW, "adamw", batches=GLOBAL_BATCHES)
    tables = reference_global_bank(initial)[0]
    for got, want in zip(store.values, tables):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the dense table is trained by the main optimizer: accepted and ignored
    SemanticProxies(C, D, 3, COUNTS, class_prompt_store="device", class_prompt_step="global")
    for where in ("host", "device"):
        with pytest.raises(UserError, match="class_prompt_step"):
            SemanticProxies(C, D, 3, COUNTS, class_prompt_store=where, class_prompt_step="row")


def test_host_store_checkpoint_passes_the_resume_check_and_another_class_count_is_named():
    """The bank's tables live in a dict (extra state): the resume check compares them as
    tensors (a sop_deep resume crashed on the dict; another class count went unnoticed)."""
    from vpt_dml.checkpoints import state_differences

    host = semantic(0, "host")
    assert state_differences(semantic(1, "host").state_dict(), host.state_dict()) == []
    # a trained bank holds optimizer moments a freshly built one creates at its first step
    prompts = [p for p in host.class_prompts.gather(torch.tensor([1, 2])) if p is not None]
    sum(p.sum() for p in prompts).backward()
    host.class_prompts.store.step({"lr": 0.1}, "adamw")
    assert state_differences(semantic(1, "host").state_dict(), host.state_dict()) == []
    torch.manual_seed(0)
    bigger = SemanticProxies(C + 1, D, 3, COUNTS, class_prompt_store="host")
    diffs = state_differences(bigger.state_dict(), host.state_dict())
    assert any("_extra_state" in name and found[0] == C for name, found, _ in diffs if found)
