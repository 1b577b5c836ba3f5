"""Typed, strict, layered configuration: defaults < YAML < CLI dot-list overrides."""

from sar_scale.config.base import (
    ConfigError,
    StrictModel,
    apply_overrides,
    dump_config,
    load_config,
    parse_overrides,
)

__all__ = [
    "ConfigError",
    "StrictModel",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_overrides",
]
