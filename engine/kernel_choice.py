"""The one kernel switch of the engine: Triton kernels or their pure-torch twins.

`Engine(kernels=...)` drives attention (extend + decode), the noisy LoRA linear (LoRA and
full-weight modes, perturbed or not) and the ZO update. "auto" is Triton on CUDA and torch
elsewhere. "triton" on a CPU device runs the very same kernels in Triton's interpreter, which must
have been switched on (TRITON_INTERPRET=1) before triton was first imported: asking for it
otherwise is a ValueError here rather than a crash deep inside Triton.
"""
from __future__ import annotations

import os

import torch

from kernels import HAS_TRITON

KERNELS = ("auto", "torch", "triton")


def triton_interpreted() -> bool:
    """True when this process built the project's Triton kernels for the interpreter.

    The environment variable alone is not enough: Triton reads it when a kernel is decorated, so
    setting it after `kernels` was imported changes nothing.
    """
    from kernels import attention  # noqa: the module whose kernels the engine launches first

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every Triton 3.x has it
        return False
    return isinstance(attention._extend_kernel, InterpretedFunction)


def check_triton_device(device: torch.device, what: str = "kernels='triton'") -> None:
    """Raise ValueError if Triton kernels cannot run on `device` in this process."""
    if not HAS_TRITON:
        raise ValueError(f"{what} needs the package 'triton', which is not installed (Linux: pip install triton); "
                         f"use kernels='torch'")
    if device.type == "cuda" or triton_interpreted():
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        hint = "TRITON_INTERPRET=1 is set, but only after triton was imported; set it before the first import"
    else:
        hint = "set TRITON_INTERPRET=1 in the environment before triton is first imported"
    raise ValueError(f"{what} on a {device.type} device runs the Triton kernels in Triton's interpreter: {hint} "
                     f"(e.g. `TRITON_INTERPRET=1 python ...`), or use kernels='torch'")


def resolve_kernels(requested: str, device: torch.device) -> str:
    """'auto' | 'torch' | 'triton' -> 'torch' | 'triton' for `device`; ValueError for anything else."""
    if requested not in KERNELS:
        raise ValueError(f"kernels={requested!r} is not one of {KERNELS}")
    if requested == "auto":  # without Triton (no wheel for this platform) the torch twins run everywhere
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if requested == "triton":
        check_triton_device(device)
    return requested
