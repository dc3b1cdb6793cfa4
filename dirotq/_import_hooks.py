"""Post-import hooks: run a callback right after a module is first imported (or now, if it already
is). The integrations with diffusers' quantizer registry and with PEFT use them, so ``import dirotq``
does not import either library (diffusers alone adds seconds)."""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

_CALLBACKS: dict[str, list[Callable[[ModuleType], None]]] = {}
_LOCK = threading.Lock()


def _run(callback: Callable[[ModuleType], None], module: ModuleType) -> None:
    # an integration that fails must not break the import of the library it extends
    try:
        callback(module)
    except Exception:  # logged with its traceback; the caller's own check raises on use
        logger.warning("dirotq: the integration hook for %s failed", module.__name__, exc_info=True)


class _Loader(importlib.abc.Loader):
    """Wraps the real loader: executes the module, then the callbacks waiting for it."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec):  # importlib protocol
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _LOCK:
            callbacks = _CALLBACKS.pop(self._name, [])
        for callback in callbacks:
            _run(callback, module)

    def __getattr__(self, attr: str) -> Any:  # resources, get_source, … of the real loader
        return getattr(self._loader, attr)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders and wraps the loader of a watched module."""

    def find_spec(self, fullname, path, target=None):  # importlib protocol
        if fullname not in _CALLBACKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


_FINDER = _Finder()


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once module ``name`` is imported: now if it already is, else right
    after its first import (a failing callback is logged, never raised into that import)."""
    module = sys.modules.get(name)
    if module is not None:
        _run(callback, module)
        return
    with _LOCK:
        _CALLBACKS.setdefault(name, []).append(callback)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
