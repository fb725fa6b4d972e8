"""Reading ``params.yaml``: the file, one section built as its config, the whole file checked.

:func:`load_section` is what stages, flows, scripts and benchmarks call; :func:`build` turns a
mapping into a config with unknown keys and wrong types reported in one line; :func:`check_params`
validates every section and the cycle chain (the ``check_params`` stage).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

from hst.config import (ConfigError, CycleConfig, FlowConfig, GateConfig, GrowConfig, ModelConfig, PrepareConfig,
                        ServeConfig, TrackingConfig, TrainConfig, _require)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated in one mapping (plain YAML keeps the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_params(path: str | Path) -> dict:
    """The whole params file at ``path`` (the caller names it) as a mapping of sections."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    return parse_params(text, str(path))


def parse_params(text: str, where: str) -> dict:
    """Params text (from a file or a git ref named by ``where``) as a mapping of sections."""
    try:
        params = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: expected a mapping of sections at the top level")
    return params


def build(cls, section: dict | None, where: str):
    """``cls(**section)`` with unknown keys and wrong types reported as ``ConfigError``."""
    section = dict(section or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for key, value in section.items():
        _check_type(f"{where}.{key}", value, hints[key])
    try:
        return cls(**section)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


def _check_type(name: str, value, hint) -> None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if any(_is_instance(value, o) for o in options):
            return
        want = " or ".join(_type_name(o) for o in options)
    else:
        if _is_instance(value, hint):
            return
        want = _type_name(hint)
    raise ConfigError(f"{name}: expected {want}, got {type(value).__name__} {value!r}")


def _is_instance(value, hint) -> bool:
    if hint is type(None):
        return value is None
    if hint is float:  # YAML writes 1 for 1.0; .inf/.nan are never a usable setting
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    origin = typing.get_origin(hint)
    if origin is tuple or origin is list:
        (item,) = typing.get_args(hint)[:1]
        return isinstance(value, (list, tuple)) and all(_is_instance(v, item) for v in value)
    if origin is dict:
        kt, vt = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _is_instance(k, kt) and _is_instance(v, vt) for k, v in value.items())
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    if hint is float:
        return "finite float"
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "null")


def load_section(path: str | Path, name: str, cls=None):
    """Section ``name`` of the params file at ``path``: built as ``cls`` (an optional section that is
    absent gives ``cls()``), or the plain mapping without ``cls``; errors name ``<path>:<name>.<key>``."""
    params = read_params(path)
    if cls is not None and name not in params and name in OPTIONAL_SECTIONS:
        return cls()
    if not isinstance(params.get(name), dict):
        raise ConfigError(f"{path}: section {name!r} missing or not a mapping")
    return params[name] if cls is None else build(cls, params[name], f"{path}:{name}")


def check_cycle_mode(mode: str, ffn: str, where: str = "params.yaml") -> None:
    """Modes that train experts need a mixture of experts, and growth needs HST's key router."""
    _require(mode != "experts" or ffn != "dense",
             f"{where}:cycle.mode: 'experts' needs model.ffn key or learned (use full or full_replay)")
    _require(mode != "grow" or ffn == "key",
             f"{where}:cycle.mode: 'grow' needs model.ffn key, got {ffn!r} (use experts, full or full_replay)")


# Every top-level section of params.yaml, with the config it is built as (None: checked by hand).
SECTIONS = {"prepare": PrepareConfig, "model": ModelConfig, "pretrain": TrainConfig, "cycles": None,
            "cycle": CycleConfig, "consolidate": TrainConfig, "grow": GrowConfig, "gate": GateConfig,
            "tracking": TrackingConfig, "flow": FlowConfig, "serve": ServeConfig}
OPTIONAL_SECTIONS = ("flow", "serve")


def check_params(params, where: str = "params.yaml") -> dict:
    """Validate a whole params file (every section, every key, the cycle chain); return the built configs.

    DVC tracks only the keys a stage names, so a misspelt key would otherwise pass silently; this
    check depends on the whole file.
    """
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: expected a mapping of sections at the top level")
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; expected some of {sorted(SECTIONS)}")
    missing = [s for s in SECTIONS if s not in params and s not in OPTIONAL_SECTIONS]
    if missing:
        raise ConfigError(f"{where}: missing section(s) {missing}")
    built = {name: build(cls, params.get(name), f"{where}:{name}")
             for name, cls in SECTIONS.items() if cls is not None}
    domains = set(built["prepare"].domains)
    extra = sorted(set(built["pretrain"].domains) - domains)
    _require(built["pretrain"].domains and not extra,
             f"{where}:pretrain.domains: expected a non-empty list of prepare.domains, got unknown {extra}")
    check_cycle_mode(built["cycle"].mode, built["model"].ffn, where)
    cycles = params["cycles"]
    if not isinstance(cycles, dict):
        raise ConfigError(f"{where}:cycles: expected a mapping of cycle key -> {{domain, prev}}")
    for i, (key, item) in enumerate(cycles.items()):
        name = f"{where}:cycles.{key}"
        _require(isinstance(key, str) and key.replace("_", "").replace("-", "").isalnum(),
                 f"{name}: key must be letters, digits, '-' or '_'")
        _require(isinstance(item, dict) and set(item) == {"domain", "prev"},
                 f"{name}: expected a mapping with exactly the keys domain and prev")
        _require(item["domain"] in domains, f"{name}.domain: expected one of prepare.domains, got {item['domain']!r}")
        earlier = ["pretrain", *list(cycles)[:i]]
        _require(item["prev"] in earlier, f"{name}.prev: expected pretrain or an earlier cycle, got {item['prev']!r}")
    return built
