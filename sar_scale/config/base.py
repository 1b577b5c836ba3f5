"""Strict pydantic configs loaded from YAML with ``key.sub=value`` overrides.

Every component owns a config class derived from :class:`StrictModel`; unknown keys are errors
(a typo never becomes a silent default) and a bad value raises :class:`ConfigError` naming the
field and, for enumerations, the allowed values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{field}' (check the spelling; unknown keys are errors)")
            continue
        msg = e["msg"]
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            msg = f"{msg} (allowed: {ctx['expected']})"
        lines.append(f"  - {field}: {msg}; got {e.get('input')!r}")
    return "\n".join(lines)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse ``a.b=1 c=[1,2]`` into a nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def apply_overrides(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = apply_overrides(merged[k], v)
        else:
            merged[k] = v
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    # `defaults: other.yaml` (relative to this file) layers this file over another one.
    parent = data.pop("defaults", None)
    if parent:
        data = apply_overrides(_read_yaml((path.parent / parent).resolve()), data)
    return data


def load_config(cls: type[T], source: str | Path | dict[str, Any] | None = None,
                overrides: list[str] | None = None) -> T:
    """Build ``cls`` from defaults < YAML file (or dict) < dot-list overrides, strictly."""
    if source is None:
        data: dict[str, Any] = {}
        name = "defaults"
    elif isinstance(source, dict):
        data, name = dict(source), "dict"
    else:
        data, name = _read_yaml(Path(source)), str(source)
    data = apply_overrides(data, parse_overrides(overrides))
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, name)) from None


def dump_config(cfg: BaseModel, path: str | Path) -> Path:
    """Write the resolved config (YAML, or JSON when the suffix is .json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(cfg.model_dump_json())
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2, sort_keys=False))
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
