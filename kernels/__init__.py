"""Triton kernels and their pure-torch references.

Names are loaded on first use (PEP 562), so `import kernels` is cheap and never needs Triton;
without Triton every module still imports and only a Triton launch raises
`kernels.TritonUnavailableError` (see kernels/_triton.py).
"""
from __future__ import annotations

import importlib
from typing import Any

from ._triton import HAS_TRITON, TritonUnavailableError, require_triton, triton_supported, triton_version

# public name -> submodule that defines it
_LAZY = {
    "derive_seed": "noise", "randn": "noise", "randn_triton": "noise",
    "lora_noise": "lora_ref", "noisy_lora_linear": "lora",
    "zo_update_": "zo_update", "zo_update_many_": "zo_update",
}

__all__ = ["derive_seed", "randn", "randn_triton", "lora_noise", "noisy_lora_linear", "zo_update_", "zo_update_many_",
           "HAS_TRITON", "TritonUnavailableError", "require_triton", "triton_supported", "triton_version"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
