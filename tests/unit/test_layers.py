"""What the layered layout (issue 29) promises beyond moving code: one rank-zero test, one
owner of metrics.json, proxies checked through their `_target_`."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from conftest import compose_config, tiny_overrides

from vpt_dml import distributed
from vpt_dml.errors import UserError
from vpt_dml.models.build import build_proxies
from vpt_dml.models.semantic_proxies import SemanticProxies
from vpt_dml.runs import record
from vpt_dml.runs.config_schema import check_config
from vpt_dml.runs.resume import differences

RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


@pytest.mark.parametrize(
    ("env", "zero"),
    [
        ({}, True),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
        # the first process of the second node: not rank zero (one of the old tests said it was)
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
        ({"GROUP_RANK": "1", "LOCAL_RANK": "0", "RANK": "2"}, False),
        ({"SLURM_PROCID": "3"}, False),
        ({"LOCAL_RANK": ""}, True),
    ],
)
def test_the_one_rank_zero_test_reads_every_launcher_variable(monkeypatch, env, zero):
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert distributed.is_global_zero() is zero


def test_record_round_trip_with_one_set_of_defaults(tmp_path: Path):
    assert record.read_record(tmp_path) is None and record.status_of(tmp_path) is None
    written = {"status": str(record.Status.DIVERGED), "metrics": {"recall@1_before": 0.5}}
    path = record.write_record(tmp_path, written)
    assert path == tmp_path / "metrics.json"
    assert json.loads(path.read_text()) == written
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left
    assert record.status_of(tmp_path) == "diverged" == record.Status.DIVERGED
    # an older file: no status (a finished run then), no metrics
    path.write_text(json.dumps({"best": {"epoch": 1}}))
    old = record.read_record(path)
    assert old["status"] == "finished" and old["metrics"] == {}
    assert record.saved_recall(tmp_path) is None
    path.write_text("{not json")
    with pytest.raises(record.RecordUnreadable) as err:
        record.read_record(tmp_path)
    assert isinstance(err.value, UserError) and err.value.path == path
    assert record.status_of(tmp_path) == "unreadable"


def test_concurrent_writers_never_leave_a_partial_record(tmp_path: Path):
    """The SIGTERM watchdog's thread and the run may write at once: each write is whole."""
    big = {"status": "finished", "metrics": {f"m{i}": float(i) for i in range(2000)}}
    small = {"status": "interrupted", "interrupted": {"watchdog": "yes"}, "metrics": {}}
    errors: list[Exception] = []

    def write(result):
        try:
            for _ in range(20):
                record.write_record(tmp_path, result)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(r,)) for r in (big, small)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        result = record.read_record(tmp_path)  # never a half-written file
        assert result is None or result in (big, small)
    for t in threads:
        t.join()
    assert not errors
    assert record.read_record(tmp_path) in (big, small)
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            ["model.proxy.class_prompt_store=disk"],
            ["model.proxy.class_prompt_store='disk'", "'host'"],
        ),
        (
            ["model/proxy=semantic_mix", "+model.proxy.dropout=0.1"],
            ["proxies.semantic_mix takes no dropout"],
        ),
        (
            ["model/proxy=learned", "+model.proxy.class_prompts.num=2"],
            ["model.proxy.class_prompts"],
        ),
        (["model.proxy.bias_ratio=high"], ["model.proxy.bias_ratio='high'", "a number"]),
    ],
)
def test_proxy_keys_are_those_of_its_factory(tmp_path: Path, overrides, words):
    cfg = compose_config(tiny_overrides(*overrides), tmp_path)
    with pytest.raises(UserError) as err:
        check_config(cfg)
    for word in words:
        assert word in str(err.value), err.value


def test_a_config_from_before_the_proxy_target_builds_the_same_proxies():
    """Checkpoints and hand-made mappings name the proxy by `kind` only."""
    import torch

    node = {"bias_ratio": 0.3, "class_prompts": {"num": 2, "depth": 1}, "update": "gru"}
    torch.manual_seed(0)
    old = build_proxies({"kind": "semantic_gru", **node}, 5, 8, 4, 2)
    torch.manual_seed(0)
    new = build_proxies(
        {"_target_": "vpt_dml.models.proxies.semantic_gru", "_partial_": True, **node}, 5, 8, 4, 2
    )
    assert isinstance(old, SemanticProxies) and type(old) is type(new)
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items()):
        assert torch.equal(a, b), name
    # and resuming such a checkpoint is no config change
    saved = {"model": {"proxy": {"kind": "semantic_gru"}}}
    now = {
        "model": {
            "proxy": {
                "_target_": "vpt_dml.models.proxies.semantic_gru",
                "_partial_": True,
                "kind": "semantic_gru",
            }
        }
    }
    assert differences(saved, now) == []
    assert differences(now, saved) != []  # dropping it is a change
