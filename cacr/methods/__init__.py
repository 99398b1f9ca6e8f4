"""The self-supervised methods, built by name from the config (see :mod:`cacr.methods.base` for the
interface the trainer relies on).

=========  ==============================================  ==========================================
name       networks                                        loss (``cacr/loss.py``)
=========  ==============================================  ==========================================
cacr       one encoder f + head g shared by all views      :func:`cacr.loss.cacr_loss`
infonce    the same                                        :func:`cacr.loss.infonce_loss`
=========  ==============================================  ==========================================

``build_method(name, model=..., loss=..., **extra)``: ``model`` / ``loss`` are the plain dicts of
the config sections of the same names (``pipeline.config.to_dict``); ``extra`` carries what a
method may need beyond them (``num_views``, ``momentum``, ...), and every method ignores what it
does not use.

Importing this package imports every module in it, so a method registers itself where it is
defined (``@register("name")`` in its own module) and adding one means adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from cacr.methods.base import METHOD_CLASSES, METHODS, Method, register, view_groups

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHOD_CLASSES", "METHODS", "Method", "build_method", "register", "view_groups"]


def build_method(name: str, *, model: dict[str, Any], loss: dict[str, Any], **extra: Any) -> Method:
    """The method registered as ``name``, with its networks freshly initialised (seed the global
    torch RNG first for identical weights on every worker)."""
    try:
        factory = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None
    return factory(model=model, loss=loss, **extra)
