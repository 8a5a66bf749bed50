"""Lazy re-exports for a package's ``__init__`` (PEP 562): a name is imported from its module on first use, so
importing the package, or one light submodule of it, does not import the heavy dependencies of the others."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The package's ``__getattr__``: ``exports`` maps each re-exported name to its module, absolute
    (``rlhf_core.trainers.ppo.config``) or relative to ``package`` (``config``)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(module if "." in module else f"{package}.{module}"), name)

    return __getattr__
