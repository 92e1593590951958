"""Triton when it is installed, else a stand-in that lets the kernel modules import.

Triton ships wheels for Linux only, and the CPU path never launches a Triton kernel (it runs the
pure-torch twins), so `import kernels` / `import engine` must work without it. Without Triton the
`@triton.jit` functions become `MissingTritonKernel`s: defining them works, launching one raises
`TritonUnavailableError` naming what to install. Supported Triton: >= 3.6 (the GPU machine's) and
< 4 (tested up to 3.9).
"""
from __future__ import annotations

import importlib.util
from typing import Any

SUPPORTED = ((3, 6), (4, 0))  # [lowest, first unsupported) major.minor


class TritonUnavailableError(RuntimeError):
    """A Triton kernel was asked for on a machine without the `triton` package."""


def _message(what: str) -> str:
    return (f"{what} needs the package 'triton', which is not installed (Triton ships wheels for Linux only: "
            "`pip install triton`); on this machine use the torch path "
            "(attention_backend='torch', impl='torch'), which computes the same results")


class MissingTritonKernel:
    """Stands in for a `@triton.jit` function; any launch raises TritonUnavailableError."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __getitem__(self, grid: Any) -> Any:
        raise TritonUnavailableError(_message(f"the Triton kernel {self.__name__}"))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TritonUnavailableError(_message(f"the Triton kernel {self.__name__}"))


class _MissingTriton:
    """The few `triton.*` names used at import time; everything else raises when used."""

    __version__ = None

    @staticmethod
    def jit(fn: Any = None, **_: Any) -> Any:
        if fn is None:  # @triton.jit(...) with options
            return MissingTritonKernel
        return MissingTritonKernel(fn)

    @staticmethod
    def cdiv(a: int, b: int) -> int:  # launchers size grids before they launch; the launch then fails
        return -(-a // b)

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 << max(0, int(n) - 1).bit_length()

    def __getattr__(self, name: str) -> Any:
        raise TritonUnavailableError(_message(f"a Triton kernel launch (triton.{name})"))


class _MissingLanguage:
    """`tl`: attribute access works (annotations such as `tl.constexpr` are evaluated at import)."""

    def __getattr__(self, name: str) -> Any:
        return object


def _available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON = _available()
if HAS_TRITON:
    try:
        import triton
        import triton.language as tl
    except ImportError:  # a broken install counts as none
        HAS_TRITON = False
if not HAS_TRITON:
    triton = _MissingTriton()  # type: ignore[assignment]
    tl = _MissingLanguage()  # type: ignore[assignment]


def triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, or None without one."""
    if not HAS_TRITON:
        return None
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def triton_supported() -> bool:
    """True when Triton is installed and inside SUPPORTED."""
    v = triton_version()
    return v is not None and SUPPORTED[0] <= v < SUPPORTED[1]


def require_triton(what: str) -> None:
    """Raise TritonUnavailableError (a RuntimeError) when `what` (e.g. "impl='triton'") cannot run."""
    if not HAS_TRITON:
        raise TritonUnavailableError(_message(what))


__all__ = ["HAS_TRITON", "SUPPORTED", "MissingTritonKernel", "TritonUnavailableError", "require_triton",
           "tl", "triton", "triton_supported", "triton_version"]
