"""Refuse a composed config that cannot mean what it says, before anything runs.

`check_config(cfg)` raises a one-line UserError for:
- a key nothing reads (`+optim.learning_rate=1e-3`, `+eval_before_trainig=false`): a
  node's known keys are those of its config group's option files (conf/<group>/*.yaml;
  train.yaml for the root), or, for a node built from a `_target_`, the parameters that
  target accepts. The message names the nearest known spelling.
- a value of the wrong type (`trainer.max_epochs=abc`): the expected types are those of
  the option files' values and of the `_target_`'s annotations. null is always accepted
  (it means "off" or "the code's default" throughout).
- a value left at ??? (a shared base file picked as an option);
- self-contradictory method settings: a `model.peft.name` whose switches are another
  method's (PEFT_METHODS in models/method_summary.py), `model.proxy` keys that the proxy
  kind does not use, `optim` keys its optimizer and scheduler never read;
- values no run can use: a batch size below 1, a negative learning rate or weight decay,
  `model.embed_dim=0` (no head is spelled `null`), all in POSITIVE / NON_NEGATIVE.

`check_command_line(argv)` runs before Hydra parses the command line, for what Hydra
itself answers with a traceback or a parser dump: a config group set to null
(`callbacks=null`) and non-ASCII characters outside quotes (a path such as `outputs/über`).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from vpt_dml.errors import UserError
from vpt_dml.models.method_summary import (
    CUSTOM,
    PEFT_METHODS,
    SWITCHES,
    describe,
    features_from_config,
    matches,
    peft_method_of,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# folders of conf/ whose files are not options of one config node
NOT_OPTIONS = {"hydra", "experiment", "hparams_search"}
# keys the code reads that no option file spells, with their types (debug / overwrite are
# also in train.yaml; listing them keeps the check independent of it)
CODE_KEYS: dict[str, set[str]] = {
    "debug": {"bool"},
    "overwrite": {"bool"},
    "model.peft.adapter.num_blocks": {"int"},
}
# values that take more types than the option files show
EXTRA_TYPES: dict[str, set[str]] = {"model.grad_checkpointing": {"float"}}
# passed through to a library as they are: children not checked
OPEN = {"model.backbone.kwargs", "loss.kwargs", "loss.miner"}  # loss.*: losses/pml.py checks them
# may gain new entries (each its own `_target_`, checked against that target)
EXTENSIBLE = {"callbacks", "logger"}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# code reads them from these nodes directly (everything else in optim feeds the
# optimizer / scheduler nodes through interpolation)
OPTIM_READ_BY_CODE = {"lr", "lr_proxy", "weight_decay", "weight_decay_proxy"}
PROXY_KINDS = ("learned", "semantic_mix", "semantic_gru")
# model.proxy keys only one semantic kind reads
PROXY_EXCLUSIVE = {"semantic_gru": {"update", "dropout"}, "semantic_mix": {"mix_lambda"}}
GRU_UPDATES = ("gru", "gru_relu")

KIND_WORDS = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "list": "a list",
    "dict": "a mapping",
}


def check_config(cfg: DictConfig) -> None:
    """Raise UserError (one line) when `cfg` holds unknown keys, wrong types, unset values
    or method settings that contradict their own name."""
    known = known_keys(tuple(_conf_dirs(cfg)))
    _walk(cfg, known, "", known)
    model = cfg.get("model") or {}
    if model.get("peft") is not None:
        check_peft(model.peft)
    if model.get("proxy") is not None:
        check_proxy(model.proxy)
    if cfg.get("optim") is not None:
        check_optim(cfg.optim)
    check_values(cfg)


# -- values ----------------------------------------------------------------------------
# key -> how to fix it; null means the code's default here, so it is refused only where
# no default exists (the batch sizes)
POSITIVE = {
    "data.batch_size": "give a multiple of data.samples_per_class, e.g. data.batch_size=64",
    "data.samples_per_class": "give e.g. data.samples_per_class=2",
    "data.eval_batch_size": "give e.g. data.eval_batch_size=256",
    "model.embed_dim": "give e.g. model.embed_dim=384, or model.embed_dim=null for no head "
    "(the raw pooled feature)",
}
NULL_REFUSED = {"data.batch_size", "data.samples_per_class", "data.eval_batch_size"}
NON_NEGATIVE = {
    "optim.lr": "e.g. optim.lr=1e-3",
    "optim.lr_proxy": "e.g. optim.lr_proxy=1e-2",
    "optim.weight_decay": "e.g. optim.weight_decay=1e-4 (0 turns it off)",
    "optim.weight_decay_proxy": "e.g. optim.weight_decay_proxy=0",
}


def check_values(cfg: DictConfig) -> None:
    """Refuse numbers no run can use, before a library fails on them mid-run."""
    for key, fix in POSITIVE.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if value is None:
            if key in NULL_REFUSED and _has(cfg, key):
                raise UserError(f"{key}=null: it must be a positive integer; {fix}")
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
            raise UserError(f"{key}={value} must be a positive integer; {fix}")
    for key, fix in NON_NEGATIVE.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise UserError(f"{key}={value} is negative: it must be 0 or more, {fix}")


def _has(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


# -- the command line, before Hydra ------------------------------------------------------
def config_groups(conf: Path = CONF_DIR) -> dict[str, list[str]]:
    """Config group (e.g. `callbacks`, `model/peft`) -> its option names."""
    groups = {}
    for folder in sorted(p for p in conf.rglob("*") if p.is_dir()):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options:
            groups[str(folder.relative_to(conf))] = options
    return groups


NO_GROUP_FIX = {
    "callbacks": "callbacks=none runs without the optional callbacks (no checkpoints, images "
    "or progress lines), ~callbacks.NAME drops one (e.g. ~callbacks.dashboard)",
    "logger": "logger=none runs without loggers (no csv/metrics.csv); metrics.json is still written",
}


def check_command_line(argv: list[str]) -> None:
    """Raise a one-line UserError for an override Hydra would answer with a traceback."""
    groups = config_groups()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if value.strip() in ("null", "~", "None") and group in groups:
            fix = NO_GROUP_FIX.get(group) or f"pick one of {', '.join(groups[group])}"
            raise UserError(f"{arg}: a config group takes an option name, not null; {fix}")
        if not _ascii_outside_quotes(arg):
            raise UserError(
                f"{arg}: Hydra reads characters other than ASCII only inside quotes; quote the "
                f"value for Hydra inside the shell's quotes: \"{key}='{value}'\""
            )


def _ascii_outside_quotes(text: str) -> bool:
    quote = None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ord(ch) > 127:
            return False
    return True


# -- method settings --------------------------------------------------------------------
def check_peft(peft: Mapping) -> None:
    name = peft.get("name")
    if name == CUSTOM:
        return
    if name not in PEFT_METHODS:
        raise UserError(
            f"model.peft.name={name!r} is not a PEFT method; use one of "
            f"{', '.join(PEFT_METHODS)} (model/peft=NAME), or {CUSTOM} for a mix of switches"
        )
    feats = features_from_config(peft)
    if matches(feats, name):
        return
    sig = PEFT_METHODS[name]
    p = peft.get("prompts") or {}
    offending = []
    if feats["prompts"] not in sig["prompts"]:
        offending.append(
            f"model.peft.prompts num={p.get('num')} depth={p.get('depth')} ({feats['prompts']} prompts)"
        )
    keys = {
        "bitfit": "bitfit",
        "full": "full",
        "adapter": "adapter.enabled",
        "lora": "lora.enabled",
    }
    node = peft if isinstance(peft, DictConfig) else OmegaConf.create(dict(peft))
    offending += [
        f"model.peft.{keys[k]}={str(OmegaConf.select(node, keys[k])).lower()}"
        for k in SWITCHES
        if feats[k] != sig[k]
    ]
    actual = peft_method_of(feats)
    fix = (
        f"model/peft={actual} trains {describe(feats)}"
        if actual != CUSTOM
        else "drop those settings"
    )
    raise UserError(
        f"model.peft.name={name} contradicts {', '.join(offending)}: {name} trains "
        f"{describe(sig)}; {fix}, or name a deliberate mix model.peft.name={CUSTOM}"
    )


def check_proxy(proxy: Mapping) -> None:
    kind = proxy.get("kind")
    if kind not in PROXY_KINDS:
        raise UserError(
            f"model.proxy.kind={kind!r} is not a proxy kind; use {', '.join(PROXY_KINDS)} "
            "(model/proxy=learned | semantic_mix | semantic_gru | semantic_gru_tanh)"
        )
    keys = set(proxy) - {"kind"}
    if kind == "learned" and keys:
        raise UserError(
            f"model.proxy.kind=learned does not use model.proxy.{', model.proxy.'.join(sorted(keys))} "
            "(semantic-proxy settings): drop them, or pick model/proxy=semantic_gru"
        )
    other = set().union(*(v for k, v in PROXY_EXCLUSIVE.items() if k != kind))
    if unused := sorted(keys & other):
        owner = next(k for k, v in PROXY_EXCLUSIVE.items() if unused[0] in v)
        raise UserError(
            f"model.proxy.kind={kind} does not use model.proxy.{', model.proxy.'.join(unused)} "
            f"(a {owner} setting): drop it, or pick model/proxy={owner}"
        )
    if kind == "semantic_gru" and proxy.get("update", "gru_relu") not in GRU_UPDATES:
        raise UserError(
            f"model.proxy.update={proxy.get('update')!r}; use gru (tanh) or gru_relu "
            "(or model/proxy=semantic_mix for the moving average)"
        )


def check_optim(optim: DictConfig) -> None:
    """A flat optim key neither the code nor the optimizer / scheduler node reads would be
    silently ignored (e.g. optim.momentum with AdamW)."""
    raw = OmegaConf.to_container(optim, resolve=False)
    referenced = set(
        re.findall(r"\$\{\.\.(\w+)\}", str({k: v for k, v in raw.items() if isinstance(v, dict)}))
    )
    for key, value in raw.items():
        if isinstance(value, dict) or key in OPTIM_READ_BY_CODE or key in referenced:
            continue
        target = (raw.get("optimizer") or {}).get("_target_", "the optimizer")
        raise UserError(
            f"optim.{key} is read by nothing: {target} and the scheduler take no {key}; "
            "drop it, or pick the optim option that uses it (e.g. optim=sgd for momentum)"
        )


# -- known keys -------------------------------------------------------------------------
class Known:
    """A node of the known-keys tree: its children and the value kinds seen for it."""

    __slots__ = ("children", "kinds")

    def __init__(self) -> None:
        self.children: dict[str, Known] = {}
        self.kinds: set[str] = set()

    def at(self, dotted: str) -> Known:
        node = self
        for part in filter(None, dotted.split(".")):
            node.kinds.add("dict")
            node = node.children.setdefault(part, Known())
        return node

    def record(self, value) -> None:
        if isinstance(value, dict):
            self.kinds.add("dict")
            for k, v in value.items():
                self.children.setdefault(str(k), Known()).record(v)
        elif (kind := kind_of(value)) not in (None, "none") and not _is_placeholder(value):
            self.kinds.add(kind)

    def paths(self, prefix: str = "") -> Iterable[str]:
        for k, child in self.children.items():
            full = f"{prefix}.{k}" if prefix else k
            yield full
            yield from child.paths(full)


def _is_placeholder(value) -> bool:
    return isinstance(value, str) and ("${" in value or value == "???")


def _package(path: Path, rel: Path) -> str | None:
    """The config node a yaml file fills (Hydra's default: its group), None for _global_
    files outside the root."""
    header = ""
    with path.open() as f:
        for line in f:
            if m := re.match(r"#\s*@package\s+(\S+)", line):
                header = m.group(1)
                break
            if line.strip() and not line.startswith("#"):
                break
    group = ".".join(rel.parent.parts)
    if not group:
        return ""
    if header == "_global_":
        return None
    return header.replace("_group_", group) if header else group


@functools.lru_cache(maxsize=8)
def known_keys(conf_dirs: tuple[Path, ...] = (CONF_DIR,)) -> Known:
    """The union of the keys of every option file, each at the node it fills."""
    root = Known()
    for conf in conf_dirs:
        for path in sorted(conf.rglob("*.yaml")):
            rel = path.relative_to(conf)
            if rel.parts[0] in NOT_OPTIONS or (package := _package(path, rel)) is None:
                continue
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
            if isinstance(data, dict):
                data.pop("defaults", None)
                root.at(package).record(data)
    for dotted, kinds in CODE_KEYS.items():
        root.at(dotted).kinds |= kinds
    return root


def _conf_dirs(cfg: DictConfig) -> list[Path]:
    """The file config sources Hydra composed from (conf/ when not known)."""
    sources = None
    if "hydra" in cfg:
        sources = OmegaConf.select(cfg, "hydra.runtime.config_sources")
    else:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            sources = HydraConfig.get().runtime.config_sources
    dirs = [
        Path(s.path)
        for s in sources or []
        if s.get("schema") == "file" and s.get("path") and Path(s.path).is_dir()
    ]
    return dirs or [CONF_DIR]


# -- `_target_` signatures ---------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def target_params(target: str) -> tuple[str, dict[str, set[str] | None]]:
    """("closed", {param: kinds or None}) for a callable with a fixed signature, ("open", {})
    when it takes **kwargs, ("unknown", {}) when it cannot be imported here."""
    try:
        obj = locate(target)
        fn = obj.__init__ if inspect.isclass(obj) else obj
        params = inspect.signature(fn).parameters
    except Exception:  # noqa: BLE001 - then the option files alone decide
        return "unknown", {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return "open", {}
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: names only
        hints = {}
    names = [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL]
    return "closed", {n: annotation_kinds(hints.get(n, inspect.Parameter.empty)) for n in names}


def locate(dotted: str):
    """The object a `_target_` names (quietly: hydra's own lookup logs its failures)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def annotation_kinds(ann) -> set[str] | None:
    """The value kinds an annotation admits (a class: a `_target_` mapping); None = any."""
    if ann is inspect.Parameter.empty or ann is typing.Any or isinstance(ann, str):
        return None
    if ann is type(None):
        return {"none"}
    simple = {bool: {"bool"}, int: {"int"}, float: {"float"}, str: {"str"}}
    if ann in simple:
        return simple[ann]
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        out: set[str] = set()
        for arg in typing.get_args(ann):
            kinds = annotation_kinds(arg)
            if kinds is None:
                return None
            out |= kinds
        return out
    if origin is typing.Literal:
        return {k for v in typing.get_args(ann) if (k := kind_of(v))}
    container = origin or ann
    if inspect.isclass(container):
        if issubclass(container, Mapping):
            return {"dict"}
        if issubclass(container, (Sequence, Iterable)) and not issubclass(container, str):
            return {"list"}
        return {"dict"}  # an object: given as a `_target_` node
    return None


# -- the walk ---------------------------------------------------------------------------
def kind_of(value) -> str | None:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    if isinstance(value, (dict, DictConfig)):
        return "dict"
    return None


_UNRESOLVED = object()


def _value(node: DictConfig, key: str):
    try:
        return node[key]
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra run: not checked
        return _UNRESOLVED


def _walk(node: DictConfig, known: Known | None, path: str, root: Known) -> None:
    target = node.get("_target_") if not OmegaConf.is_missing(node, "_target_") else None
    mode, params = target_params(target) if isinstance(target, str) else ("none", {})
    if mode == "open":
        return
    for key in map(str, node.keys()):
        full = f"{path}.{key}" if path else key
        if not path and key == "hydra":
            continue
        if OmegaConf.is_missing(node, key):
            raise UserError(
                f"{full} has no value (???): the option chosen for its group is a shared base, "
                f"not a complete option; pick another option or set {full}=..."
            )
        child = known.children.get(key) if known else None
        if key in HYDRA_KEYS and (mode == "closed" or child is not None):
            continue
        if mode == "closed":
            if key not in params:
                _unknown(full, path, params.keys(), root, target)
            kinds = params[key]
            if kinds is not None and child is not None:
                kinds = kinds | child.kinds
        elif child is not None:
            kinds = child.kinds or None
        elif known is None or path in EXTENSIBLE:
            kinds = None  # a new entry / unknown ground: its own `_target_` is still checked
        else:
            _unknown(full, path, known.children.keys(), root)
        value = _value(node, key)
        if kinds is not None and value is not _UNRESOLVED:
            _check_type(full, value, kinds | EXTRA_TYPES.get(full, set()))
        if isinstance(value, DictConfig) and full not in OPEN:
            _walk(value, child, full, root)


def _check_type(full: str, value, kinds: set[str]) -> None:
    kind = kind_of(value)
    if kind is None or kind == "none" or kind in kinds or not kinds - {"none"}:
        return
    if kind == "int" and "float" in kinds:
        return
    expected = " or ".join(KIND_WORDS[k] for k in sorted(kinds) if k in KIND_WORDS)
    shown = value if kind in ("dict", "list") else repr(value)
    raise UserError(f"{full}={shown} has the wrong type: expected {expected}")


def _initials(name: str) -> str:
    return "".join(w[0] for w in name.split("_") if w)


def nearest(key: str, candidates: Iterable[str]) -> str | None:
    """The closest spelling (abbreviations such as learning_rate -> lr count as close)."""
    candidates = [c for c in candidates if c not in HYDRA_KEYS]
    for c in candidates:
        if len(c) > 1 and (_initials(key) == c or key == _initials(c)):
            return c
    best = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    return best[0] if best else None


def _unknown(
    full: str, path: str, siblings: Iterable[str], root: Known, target: str | None = None
) -> typing.NoReturn:
    key = full.rsplit(".", 1)[-1]
    siblings = list(siblings)
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.75)
    guess = close[0] if close else None
    where = f"{path}." if path else ""
    if target is not None:
        guess = guess or nearest(key, siblings)
        hint = f"; nearest known: {where}{guess}" if guess else ""
        raise UserError(
            f"unknown config key {full}: {target} takes no {key}{hint}; remove it or correct "
            "the spelling"
        )
    if guess is None:
        # the same name one level elsewhere, e.g. +max_epochs=5 -> trainer.max_epochs
        elsewhere = [p for p in root.paths() if p.rsplit(".", 1)[-1] == key and p != full]
        if elsewhere:
            raise UserError(
                f"unknown config key {full} (nearest known: {elsewhere[0]}); "
                "remove it or write the full key"
            )
        guess = nearest(key, siblings)
    hint = f"nearest known: {where}{guess}" if guess else f"{path or 'the root'} takes no keys"
    raise UserError(f"unknown config key {full} ({hint}); remove it or correct the spelling")
