"""MeZO parameter update (DESIGN.md section 5): p ← p − lr·(Σ_k g_k z_k + wd·p), z_k = randn(seed_k, p.shape).

The noise is regenerated from the seeds, never stored. The projected gradients g stay on the device
and the Triton path reads them inside the kernel, so an optimizer step needs no host synchronisation.
One pass over the parameter's memory however many (seed, g) pairs are folded in.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Sequence

import torch
from ._triton import tl, triton  # a stand-in when Triton is not installed

from ._device import host_to_device
from .launch_config import target_of, zo_update_config
from .noise_cache import cached_randn

__all__ = ["zo_update_", "zo_update_ref_", "zo_update_many_"]

_TORCH_CHUNK = 1 << 20  # elements per chunk in the torch path (bounds the float32 temporaries)
# elements per flat group of small tensors: temporaries of 128 KiB come from the allocator's free
# lists; megabyte ones are fresh pages each time, whose faults cost more than the arithmetic
_GROUP_ELEMS = 1 << 15


@triton.jit(do_not_specialize=["n_seeds"])
def _zo_update_kernel(p_ptr, seed_ptr, grad_ptr, n_seeds, numel, lr, wd, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32 counters: numel < 2^31
    mask = idx < numel
    p = tl.load(p_ptr + idx, mask=mask)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(n_seeds):
        seed = tl.load(seed_ptr + k)
        g = tl.load(grad_ptr + k).to(tl.float32)
        acc += g * tl.randn(seed, idx)
    tl.store(p_ptr + idx, p - lr * (acc + wd * p), mask=mask)


def _seed_tensor(seeds: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(seeds, torch.Tensor):
        return seeds.to(device=device, dtype=torch.int64)
    # pinned + non_blocking on a GPU: the copy is queued, the host never waits
    return host_to_device(torch.tensor([int(s) for s in seeds], dtype=torch.int64), device)


def _grad_tensor(grads: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(grads, torch.Tensor):
        return grads.reshape(-1).to(device=device, dtype=torch.float32)
    return torch.tensor([float(g) for g in grads], dtype=torch.float32, device=device)


def zo_update_ref_(param: torch.Tensor, seeds: Sequence[int] | torch.Tensor, grads: Sequence[float] | torch.Tensor,
                   lr: float, weight_decay: float = 0.0) -> torch.Tensor:
    """Torch reference of :func:`zo_update_`: materializes each z_k chunk by chunk."""
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()  # the reference may sync; the Triton path never does
    g = _grad_tensor(grads, param.device)
    if len(seeds) != g.numel():
        raise ValueError(f"{len(seeds)} seeds but {g.numel()} projected gradients")
    work = param if param.is_contiguous() else param.contiguous()
    flat = work.view(-1)
    # the forward passes of this step materialized the same z already (see noise_cache)
    noise = [cached_randn(seed, (flat.numel(),), device=flat.device) for seed in seeds]
    for start in range(0, flat.numel(), _TORCH_CHUNK):
        p = flat[start:start + _TORCH_CHUNK]
        acc = torch.zeros_like(p, dtype=torch.float32)
        for k, z in enumerate(noise):
            acc += g[k] * z[start:start + p.numel()]
        p -= lr * (acc + weight_decay * p)
    if work is not param:
        param.copy_(work)
    return param


def zo_update_(param: torch.Tensor, seeds: Sequence[int] | torch.Tensor, grads: Sequence[float] | torch.Tensor,
               lr: float, weight_decay: float = 0.0, impl: str = "auto") -> torch.Tensor:
    """In place p ← p − lr·(Σ_k grads[k]·randn(seeds[k], p.shape) + weight_decay·p); returns param.

    param: float32 (any shape; noise index = row-major flat index). seeds: ints or an int64 tensor.
    grads: float32 device tensor [n] (read in-kernel: no .item(), no host sync in the Triton path).
    impl: "torch", "triton" or "auto" (triton on CUDA).
    """
    if param.dtype != torch.float32:
        raise TypeError(f"trainable parameters are float32 (DESIGN.md section 4), got {param.dtype}")
    if impl == "auto":
        impl = "triton" if param.is_cuda else "torch"
    if impl == "torch":
        return zo_update_ref_(param, seeds, grads, lr, weight_decay)
    if impl != "triton":
        raise ValueError(f"unknown impl {impl!r}")
    numel = param.numel()
    if numel >= 2**31:
        raise ValueError("the kernels use int32 noise counters: tensors must have < 2^31 elements")
    s = _seed_tensor(seeds, param.device)
    g = _grad_tensor(grads, param.device)
    if s.numel() != g.numel():
        raise ValueError(f"{s.numel()} seeds but {g.numel()} projected gradients")
    if numel == 0 or (s.numel() == 0 and weight_decay == 0.0):
        return param
    return _zo_update_triton(param, s, g, lr, weight_decay)


def _zo_update_triton(param: torch.Tensor, s: torch.Tensor, g: torch.Tensor, lr: float,
                      weight_decay: float) -> torch.Tensor:
    numel = param.numel()
    work = param if param.is_contiguous() else param.contiguous()
    cfg = zo_update_config(numel, target_of(work.device))
    _zo_update_kernel[cfg.grid(numel)](work, s, g, s.numel(), numel, float(lr), float(weight_decay),
                                       BLOCK=cfg.block, num_warps=cfg.num_warps)
    if work is not param:
        param.copy_(work)
    return param


def zo_update_many_(params: Sequence[torch.Tensor], seeds: Sequence[Sequence[int]],
                    grads: Sequence[float] | torch.Tensor, lr: float, weight_decay: float = 0.0, impl: str = "auto",
                    on_done: Callable[[int], None] | None = None) -> None:
    """`zo_update_(params[i], seeds[i], grads, lr, weight_decay, impl)` for every i, in order.

    params: float32 tensors; seeds[i]: tensor i's Philox seeds (one per SPSA sample, the order of
    ``grads``). The torch path updates runs of small contiguous tensors on one device together, as
    one flat vector: exactly `zo_update_ref_`'s arithmetic per element (the same bits), a handful
    of ops for a LoRA adapter's ~100 tensors instead of ~10 each; larger tensors, and the Triton
    path, go one by one. ``on_done(n)`` is called whenever the first n tensors are fully
    updated (so a caller interrupted part-way knows which are). Raises TypeError for a non-float32
    tensor and ValueError when the seed lists and grads disagree in length, before touching any.
    """
    if len(seeds) != len(params):
        raise ValueError(f"{len(params)} tensors but {len(seeds)} seed lists")
    for i, p in enumerate(params):
        if p.dtype != torch.float32:
            raise TypeError(f"trainable parameters are float32 (DESIGN.md section 4), tensor {i} is {p.dtype}")
    n_grads = grads.numel() if isinstance(grads, torch.Tensor) else len(grads)
    for i, s in enumerate(seeds):
        if len(s) != n_grads:
            raise ValueError(f"every tensor needs {n_grads} seeds (one per projected gradient): seeds[{i}] has "
                             f"{len(s)}")
    if impl == "auto":
        impl = "triton" if params and params[0].is_cuda else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"unknown impl {impl!r}")
    group: list[int] = []

    def flush() -> None:
        if group:
            _foreach_update_(params, seeds, group, grads, lr, weight_decay)
            if on_done is not None:
                on_done(group[-1] + 1)
            group.clear()

    size = 0
    for i, p in enumerate(params):
        small = impl == "torch" and p.is_contiguous() and p.numel() < _GROUP_ELEMS
        if small and group and (params[group[0]].device != p.device or size + p.numel() > _GROUP_ELEMS):
            flush()
            size = 0
        if small:
            group.append(i)
            size += p.numel()
            continue
        flush()
        size = 0
        zo_update_(p, seeds[i], grads, lr, weight_decay, impl=impl)
        if on_done is not None:
            on_done(i + 1)
    flush()


def _foreach_update_(params: Sequence[torch.Tensor], seeds: Sequence[Sequence[int]], group: list[int],
                     grads: Sequence[float] | torch.Tensor, lr: float, weight_decay: float) -> None:
    """`zo_update_ref_` on the tensors ``group`` at once (one device, contiguous, <= _GROUP_ELEMS in all):
    their values and each sample's z are concatenated, the arithmetic runs once on the flat vectors
    (elementwise, so every element gets exactly the ops and roundings of `zo_update_ref_`), and the
    results are copied back in one `_foreach_copy_`, the only in-place write."""
    ps = [params[i] for i in group]
    g = _grad_tensor(grads, ps[0].device)
    flat = torch.cat([p.view(-1) for p in ps])
    acc = torch.zeros_like(flat)
    for k in range(g.numel()):
        z = torch.cat([cached_randn(int(seeds[i][k]), (p.numel(),), device=p.device) for i, p in zip(group, ps)])
        acc += g[k] * z
    flat -= lr * (acc + weight_decay * flat)
    torch._foreach_copy_(ps, [part.view(p.shape) for part, p in zip(flat.split([p.numel() for p in ps]), ps)])
