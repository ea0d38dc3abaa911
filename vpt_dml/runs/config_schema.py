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
  method's (PEFT_METHODS in models/method_summary.py), `optim` keys its optimizer and
  scheduler never read;
- a value outside the Literal a `_target_` parameter is annotated with (e.g.
  `model.proxy.update=lstm`: the proxy factories of models/proxies.py);
- values no run can use: a batch size below 1, a negative learning rate or weight decay,
  `model.embed_dim=0` (no head is spelled `null`), all in POSITIVE / NON_NEGATIVE.

The method rules are runs/config_rules.py; the command line before Hydra,
runs/command_line.py.
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
from vpt_dml.models.build import check_backbone_option
from vpt_dml.runs.command_line import CONF_DIR
from vpt_dml.runs.config_rules import check_optim, check_peft, check_values

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
OPEN = {"model.backbone.kwargs"}
# may gain new entries (each its own `_target_`, checked against that target)
EXTENSIBLE = {"callbacks", "logger"}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
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
    model = cfg.get("model") or {}
    if model.get("backbone") is not None:  # a name its option's kwargs/weights do not describe
        check_backbone_option(OmegaConf.to_container(model.backbone, resolve=False))
    known = known_keys(tuple(_conf_dirs(cfg)))
    _walk(cfg, known, "", known)
    if model.get("peft") is not None:
        check_peft(model.peft)
    if cfg.get("optim") is not None:
        check_optim(cfg.optim)
    check_values(cfg)


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
    # positional-only parameters are the caller's (a `_partial_` factory's context), no key
    names = [
        n
        for n, p in params.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)
    ]
    return "closed", {n: annotation_kinds(hints.get(n, inspect.Parameter.empty)) for n in names}


@functools.cache
def literal_values(target: str) -> dict[str, tuple]:
    """{param: allowed values} of a `_target_`'s parameters annotated with a Literal."""
    try:
        obj = locate(target)
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # noqa: BLE001 - then only the kinds are checked
        return {}
    out = {}
    for name, ann in hints.items():
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if typing.get_origin(ann) is typing.Literal:
            out[name] = typing.get_args(ann)
        elif len(args) == 1 and typing.get_origin(args[0]) is typing.Literal:
            out[name] = typing.get_args(args[0])  # Optional[Literal[...]]
    return out


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
        if mode == "closed" and value is not _UNRESOLVED and value is not None:
            allowed = literal_values(target).get(key)
            if allowed and value not in allowed:
                raise UserError(
                    f"{full}={value!r} is not one {target} takes: give one of "
                    f"{', '.join(map(repr, allowed))}, or pick another option of its group"
                )
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
