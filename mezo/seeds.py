"""Seeds of MeZO's perturbations: (run seed, step, SPSA sample k) -> the sample seed that
`kernels.derive_seed` turns into one Philox key per trainable tensor (DESIGN §4).

Noise version 1 (this module): ``step_seed(run, step, k) = c(run) ^ (k << 32 | step)`` with
``c(run) = splitmix64(run) mod 2^63``. For a fixed run this is injective in (step, k) for
step < 2^32 and k < 2^10, and together with ``derive_seed`` (which xors in the tensor index < 2^21
at bit 42, then applies a bijection of [0, 2^63)) every (step, k, tensor) of a run gets its own
Philox key: no two perturbations of a run can share noise. Different runs get unrelated keys
through c(run).

Noise version 0 (before issue 12) hashed into 31 bits, where ~3 of the first 10^5 steps collided.
Trajectory logs record the version of each step: version-0 logs replay exactly through the legacy
functions kept here; version-0 checkpoints are refused for resuming (mixing derivations in one
run would make its trajectory unreplayable).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

from kernels.noise import _splitmix64, derive_seed, derive_seed_v0

NOISE_VERSION = 1
STEP_BITS = 32  # steps < 2^32
SAMPLE_BITS = 10  # SPSA samples per step < 2^10
_SAMPLE_SHIFT = STEP_BITS  # bits 0-31: step; 32-41: k; 42-62: the tensor index (kernels.derive_seed)
_M63 = (1 << 63) - 1


def _check_int(name: str, value: int, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ValueError(f"step_seed: {name}={value!r} must be an int in [0, 2**{bits})")


def run_key(run_seed: int) -> int:
    """c(run): the run's 63-bit constant (splitmix64 of the seed, top bit dropped)."""
    _check_int("run_seed", run_seed, 63)
    return _run_key(run_seed)


@functools.lru_cache(maxsize=64)
def _run_key(run_seed: int) -> int:
    return _splitmix64(run_seed) & _M63


def step_seed(run_seed: int, step: int, k: int = 0) -> int:
    """Sample seed of SPSA sample ``k`` at ``step`` of the run seeded ``run_seed``, in [0, 2^63).

    run_seed in [0, 2^63), step in [0, 2^32), k in [0, 2^10); ValueError otherwise.
    Tensor seeds then come from ``kernels.derive_seed(sample_seed, tensor_index)``.
    """
    key = run_key(run_seed)
    _check_int("step", step, STEP_BITS)
    _check_int("k", k, SAMPLE_BITS)
    return key ^ step ^ (k << _SAMPLE_SHIFT)


def split_step_seed(run_seed: int, sample_seed: int) -> tuple[int, int]:
    """Inverse of `step_seed` for a known run: (step, k). ValueError if the seed is not one of the run's."""
    x = sample_seed ^ run_key(run_seed)
    if not 0 <= x < 1 << (STEP_BITS + SAMPLE_BITS):
        raise ValueError(f"{sample_seed} is not a sample seed of run seed {run_seed}")
    return x & ((1 << STEP_BITS) - 1), x >> _SAMPLE_SHIFT


def step_seed_v0(run_seed: int, step: int, k: int = 0) -> int:
    """Noise version 0's sample seed (replay of old trajectories only)."""
    return derive_seed_v0(derive_seed_v0(run_seed, step), k)


def tensor_seed_fn(version: int) -> Callable[[int, int], int]:
    """The (sample seed, tensor index) -> Philox seed map of a noise version."""
    if version == 1:
        return derive_seed
    if version == 0:
        return derive_seed_v0
    raise ValueError(f"noise_version={version!r} is unknown to this version of mezo (known: 0, 1); "
                     "the run was recorded by a newer version")
