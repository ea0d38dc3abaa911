"""Group choices run what they name, on every preset (issue 11).

- Every preset x every option of model/peft, model/proxy, optim, loss and data composes
  to exactly that option's own values (what the option gives with no preset).
- The three hparams_search sweeps on a preset: each job composed as Hydra's basic sweeper
  builds it, and the tiny model each job builds trains what its name says, with the
  trainable-parameter count the method's definition gives. A slow test runs the real
  multirun (`python -m ... -m +experiment=... +hparams_search=...`) and checks the same.
"""

from __future__ import annotations

import pytest
import timm
from conftest import CONF, TINY_BACKBONE
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from vpt_dml.models.method_summary import effective_method
from vpt_dml.module import VPTDMLModule
from vpt_dml.runs.config_schema import check_config

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem not in ("demo",))
GROUPS = {
    "model/peft": "model.peft",
    "model/proxy": "model.proxy",
    "optim": "optim",
    "loss": "loss",
    "data": "data",
}
# shared bases, not options (their name/kind is ???; check_config refuses them)
BASES = {"base", "semantic_base"}
# Keys a preset legitimately sets inside these nodes whatever option is picked, per group:
# the batch sampler (the preset's recipe, not the dataset's); nothing else. A preset's own
# values live in its own option files (model/peft/vptsp_sop_b.yaml).
PRESET_SETS: dict[str, set[str]] = {group: set() for group in GROUPS} | {"data": {"sampler"}}

NUM_CLASSES = 4
TINY = {"D": 32, "L": 12, "E": 16}  # TINY_BACKBONE_12: embed_dim 32, depth 12; embed_dim 16
# 12 blocks, as the presets' prompt depths (12, or 8-11) ask
TINY_BACKBONE_12 = [
    o.replace("depth: 2,", "depth: 12,") if o.startswith("++model.backbone.kwargs") else o
    for o in TINY_BACKBONE
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem not in BASES)


def option_rows() -> list[dict[str, str]]:
    """Options of all groups side by side (cycled), so one composition checks one option
    of every group and the longest group's options are all covered."""
    opts = {g: options(g) for g in GROUPS}
    n = max(len(v) for v in opts.values())
    return [{g: opts[g][i % len(opts[g])] for g in GROUPS} for i in range(n)]


def compose_all(override_lists: list[list[str]]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return [compose("train", overrides=o) for o in override_lists]


def node(cfg, dotted: str) -> dict:
    return OmegaConf.to_container(OmegaConf.select(cfg, dotted), resolve=False)


@pytest.fixture(scope="module")
def option_values() -> list[dict[str, dict]]:
    """Each row's options as they compose with no preset: the options' own values."""
    rows = option_rows()
    cfgs = compose_all([[f"{g}={o}" for g, o in row.items()] for row in rows])
    return [{g: node(cfg, GROUPS[g]) for g in GROUPS} for cfg in cfgs]


def test_option_values_are_the_options_own(option_values):
    """The reference itself: e.g. linear is all off, vpt_deep 10 prompts on every layer."""
    rows = option_rows()
    peft = {row["model/peft"]: v["model/peft"] for row, v in zip(rows, option_values)}
    assert peft["linear"]["prompts"] == {"num": 0, "depth": 0, "step": 0}
    assert not any([peft["linear"]["bitfit"], peft["linear"]["full"]])
    assert (peft["vpt_deep"]["prompts"], peft["vpt_deep"]["bitfit"]) == (
        {"num": 10, "depth": "all", "step": 0},
        False,
    )
    assert peft["vptsp_sop_b"]["prompts"] == {"num": 90, "depth": 12, "step": 5}
    proxy = {row["model/proxy"]: v["model/proxy"] for row, v in zip(rows, option_values)}
    assert proxy["learned"] == {
        "_target_": "vpt_dml.models.proxies.learned",
        "_partial_": True,
        "kind": "learned",
    }
    assert proxy["semantic_gru_tanh"]["update"] == "gru"
    assert proxy["semantic_gru"]["update"] == "gru_relu"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_option_on_a_preset_is_that_option(preset, option_values):
    rows = option_rows()
    cfgs = compose_all(
        [[f"+experiment={preset}", *(f"{g}={o}" for g, o in row.items())] for row in rows]
    )
    for row, own, cfg in zip(rows, option_values, cfgs):
        for group, dotted in GROUPS.items():
            got, want = node(cfg, dotted), dict(own[group])
            for key in PRESET_SETS[group]:
                got.pop(key, None)
                want.pop(key, None)
            assert got == want, f"+experiment={preset} {group}={row[group]}"
        check_config(cfg)


def test_preset_model_choices_yield_the_issue_example():
    """`+experiment=sop_deep model/peft=linear` was 'linear' with 90 prompts and BitFit."""
    (cfg,) = compose_all([["+experiment=sop_deep", "model/peft=linear", "model/proxy=learned"]])
    assert node(cfg, "model.peft")["prompts"] == {"num": 0, "depth": 0, "step": 0}
    assert cfg.model.peft.bitfit is False
    assert node(cfg, "model.proxy") == {
        "_target_": "vpt_dml.models.proxies.learned",
        "_partial_": True,
        "kind": "learned",
    }
    # the rest of the preset stays: its data, backbone, loss and schedule
    assert cfg.data.name == "sop" and cfg.optim.t_max == 120
    assert cfg.model.backbone.name.startswith("vit_base")


# -- sweeps on a preset ------------------------------------------------------------------
def sweep_jobs(preset: str, search: str, extra: list[str]) -> list[list[str]]:
    """Each job's overrides of `-m +experiment=preset +hparams_search=search *extra`, built
    as Hydra's basic sweeper builds them (the sweep's params first, then the command line)."""
    args = [f"+experiment={preset}", f"+hparams_search={search}", *extra]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        primary = compose("train", overrides=args, return_hydra_config=True)
    params = [f"{k}={v}" for k, v in primary.hydra.sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides(params + args)
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    return batch


def build(cfg) -> VPTDMLModule:
    def plain(n):
        return OmegaConf.to_container(n, resolve=True)

    return VPTDMLModule(plain(cfg.model), plain(cfg.loss), plain(cfg.optim), NUM_CLASSES)


def tiny_vit_counts() -> tuple[int, int]:
    """(biases, all parameters) of the tiny timm ViT, counted on timm's own model."""
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 12, "num_heads": 2}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)
    biases = sum(p.numel() for n, p in vit.named_parameters() if n.endswith("bias"))
    return biases, sum(p.numel() for p in vit.parameters())


def tokens(q: dict, layers: int) -> int:
    """Prompt tokens over the layers: N_l = max(N - l*step, 0) for l < depth."""
    depth = layers if q["depth"] == "all" else min(q["depth"], layers)
    return sum(max(q["num"] - layer * q["step"], 0) for layer in range(depth))


def expected_trainable(model: dict) -> int:
    """Trainable parameters by each method's definition (METHOD.md §1, §7) on the tiny ViT."""
    d, n_layers, e, c = TINY["D"], TINY["L"], TINY["E"], NUM_CLASSES
    biases, everything = tiny_vit_counts()
    head = 2 * d + d * e + e  # LayerNorm(D) + Linear(D -> E)
    peft, proxy = model["peft"], model["proxy"]
    n = head + tokens(peft["prompts"], n_layers) * d
    n += everything if peft["full"] else biases if peft["bitfit"] else 0
    if peft["adapter"]["enabled"]:
        b = peft["adapter"]["bottleneck"]
        n += n_layers * (d * b + b + b * d + d)
    if peft["lora"]["enabled"]:
        r = peft["lora"]["rank"]
        n += n_layers * (r * d + 3 * d * r)  # A: r x D, B: 3D x r on the fused qkv
    n += c * e  # the proxy bias B (learned: the proxies themselves)
    if proxy["kind"] != "learned":
        n += c * tokens(proxy["class_prompts"], n_layers) * d + head
        if proxy["kind"] == "semantic_gru":
            n += (e * 3 * e + 3 * e) + e * 3 * e  # input Linear with bias, hidden without
    return n


def run_sweep_in_process(preset: str, search: str) -> list[tuple[list[str], dict, dict]]:
    out = []
    for job in sweep_jobs(preset, search, TINY_BACKBONE_12):
        (cfg,) = compose_all([job])
        check_config(cfg)
        model = OmegaConf.to_container(cfg.model, resolve=True)
        out.append((job, model, effective_method(build(cfg))))
    return out


PEFT_NAMES = ["linear", "bitfit", "vpt_shallow", "vpt_deep", "adapter", "lora", "full"]


def test_peft_baselines_sweep_on_a_preset_trains_each_baseline():
    jobs = run_sweep_in_process("cub_deep_small", "peft_baselines")
    assert [m["peft"] for _, _, m in jobs] == PEFT_NAMES
    for job, model, method in jobs:
        assert method["proxy"]["kind"] == "learned", job
        assert method["trainable_parameters"] == expected_trainable(model), job
    counts = [m["trainable_parameters"] for _, _, m in jobs]
    assert len(set(counts)) == len(counts)  # seven methods, seven different counts
    by_name = {m["peft"]: m for _, _, m in jobs}
    assert by_name["vpt_shallow"]["prompt_tokens_per_layer"] == [10] + [0] * 11
    assert by_name["vpt_deep"]["prompt_tokens_per_layer"] == [10] * 12
    assert by_name["linear"]["prompt_tokens_per_layer"] == [0] * 12
    assert by_name["bitfit"]["bitfit"] and not by_name["vpt_deep"]["bitfit"]
    assert by_name["full"]["full"] and by_name["adapter"]["adapter"] and by_name["lora"]["lora"]


def test_proxy_variants_sweep_on_a_preset_runs_each_variant():
    jobs = run_sweep_in_process("cub_deep_small", "proxy_variants")
    got = [(m["proxy"]["kind"], m["proxy"].get("update")) for _, _, m in jobs]
    assert got == [
        ("learned", None),
        ("semantic_mix", "mix"),
        ("semantic_gru", "gru"),
        ("semantic_gru", "gru_relu"),
    ]
    for job, model, method in jobs:
        assert method["peft"] == "vptsp", job  # the preset's own trainable set stays
        assert method["trainable_parameters"] == expected_trainable(model), job
    counts = [m["trainable_parameters"] for _, _, m in jobs]
    assert counts[0] < counts[1] < counts[2] == counts[3]  # tanh / ReLU cells: same size


def test_prompt_length_sweep_on_a_preset_sets_the_prompts():
    jobs = run_sweep_in_process("cub_deep_small", "prompt_length")
    assert len(jobs) == 15
    for job, model, method in jobs:
        p = model["peft"]["prompts"]
        expected = [p["num"] if layer < p["depth"] else 0 for layer in range(TINY["L"])]
        assert method["prompt_tokens_per_layer"] == expected, job
        assert method["peft"] == "vptsp" and method["bitfit"], job
        assert method["trainable_parameters"] == expected_trainable(model), job
    assert {(m["peft"]["prompts"]["num"], m["peft"]["prompts"]["depth"]) for _, m, _ in jobs} == {
        (n, d) for n in (1, 5, 10, 20, 50) for d in (1, 6, 12)
    }


def test_seeds_sweep_runs_five_seeds():
    jobs = sweep_jobs("cub_deep_small", "seeds", [])
    seeds = [[o for o in job if o.startswith("seed=")] for job in jobs]
    assert seeds == [[f"seed={s}"] for s in range(0, 5000, 1000)]  # spaced: seed + epoch streams


def test_effective_method_reads_the_built_model_not_the_config():
    (cfg,) = compose_all([[*TINY_BACKBONE_12, "model/peft=linear", "model/proxy=learned"]])
    module = build(cfg)
    assert effective_method(module)["peft"] == "linear"
    vit = module.embedder.backbone.vit
    for name, p in vit.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)
    method = effective_method(module)
    assert (method["peft"], method["bitfit"]) == ("bitfit", True)
    assert method["trainable_parameters"] == expected_trainable(
        {**OmegaConf.to_container(cfg.model), "peft": {**cfg.model.peft, "bitfit": True}}
    )
    vit.patch_embed.proj.weight.requires_grad_(True)  # one weight: no method of the table
    method = effective_method(module)
    assert (method["peft"], method["partial_backbone"]) == ("custom", True)


def test_effective_method_counts_the_host_class_prompt_bank():
    (cfg,) = compose_all([[*TINY_BACKBONE_12, "model/proxy=semantic_gru_sop_s"]])
    method = effective_method(build(cfg))
    assert method["proxy"]["class_prompt_store"] == "host"
    assert method["proxy"]["class_prompt_tokens_per_layer"] == [5] * 12
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert method["trainable_parameters"] == expected_trainable(model)
