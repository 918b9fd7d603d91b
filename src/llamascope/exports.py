"""A package's names, imported from their modules on first use (a module `__getattr__`, PEP 562), so
that importing the package imports none of them: `import llamascope` stays free of PyTorch, and
the tokenizer can read `loading/spm.py` without the model code (see startup.py, loading/)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, homes: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """`__getattr__` and `__dir__` for `package`, whose globals are `namespace`: each name of
    `homes` (name -> the submodule defining it) and each submodule is imported when first asked for,
    then kept in the namespace."""

    def __getattr__(name: str):
        if name in homes:
            value = getattr(import_module(f".{homes[name]}", package), name)
        else:
            try:
                value = import_module(f".{name}", package)
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(homes))

    return __getattr__, __dir__
