"""Page-selection methods: one file each, all behind `PageSelector` (base.py).

A method module registers its class with `@register("name")`, with its settings as a
`MethodOptions` model (`options_model`, the config section named after the method); this package
discovers the modules itself, so neither the config nor the backend glue names a method.
"""

from __future__ import annotations

import importlib
import pkgutil

from vllm_sparsekv.methods.base import MethodOptions, PageSelector, register, registry

__all__ = ["MethodOptions", "PageSelector", "register", "available", "get_method"]

_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def available() -> list[str]:
    """Names accepted by the `method` config field."""
    _load_all()
    return sorted(registry)


def get_method(name: str) -> type[PageSelector]:
    _load_all()
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown sparsekv method {name!r}; allowed: {', '.join(available())}") from None
