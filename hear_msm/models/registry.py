"""Name -> constructor tables filled by the family modules (`@register_model`)."""
from __future__ import annotations

import fnmatch
from typing import Callable

_MODEL_BUILDERS: dict[str, Callable] = {}
_CONFIG_CLASSES: dict[str, type] = {}
_FAMILY_BUILDERS: dict[str, Callable] = {}


def register_family(config_class: type, build: Callable) -> None:
    """`build(config, **runtime_options) -> MaskedSpectrogramModel` for configs of this class."""
    _CONFIG_CLASSES[config_class.family] = config_class
    _FAMILY_BUILDERS[config_class.family] = build


def build_from_config(config, **runtime_options):
    return _FAMILY_BUILDERS[config.family](config, **runtime_options)


def register_model(builder: Callable) -> Callable:
    """Register `builder(**overrides) -> MaskedSpectrogramModel` under its function name."""
    _MODEL_BUILDERS[builder.__name__] = builder
    return builder


def config_classes() -> dict[str, type]:
    return dict(_CONFIG_CLASSES)


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a glob, e.g. `list_models("ssam_*")`."""
    return [name for name in _MODEL_BUILDERS if fnmatch.fnmatchcase(name, pattern)]


def model_builder(name: str) -> Callable:
    if name not in _MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(_MODEL_BUILDERS)}")
    return _MODEL_BUILDERS[name]
