"""No host sync inside a forward; a MeZO step syncs once, for its logged loss (issue 10, acceptance 4).

On CPU nothing really synchronises, so the test counts the operations that would on a GPU, made
by the project's own code (engine/, kernels/, mezo/): reading a tensor's value on the host (item,
int/float/bool, tolist, .cpu(), .numpy()) and data-dependent shapes (nonzero, boolean-mask
indexing, masked_select, repeat_interleave without output_size). Operations that the Triton
interpreter makes on the kernels' behalf are not counted: a compiled kernel makes none.
On CUDA, `torch.cuda.set_sync_debug_mode("error")` checks the real thing.
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mezo import ClassificationExample, MeZOConfig, MeZOTrainer
from mezo_fixtures import FEW_SHOT, HEADLINES
from mezo_helpers import make_engine, randomize_lora_b

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = tuple(os.path.join(ROOT, d) + os.sep for d in ("engine", "kernels", "mezo"))
aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default,  # item: what inference mode shows
            aten.nonzero.default, aten.masked_select.default,
            aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_consecutive.default}


def _caller(roots: tuple[str, ...]) -> str | None:
    """'file:line' of the innermost frame outside torch if it lies under `roots`, else None."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if os.sep + "torch" + os.sep not in name and name != __file__:
            return f"{os.path.relpath(name, ROOT)}:{frame.f_lineno}" if name.startswith(roots) else None
        frame = frame.f_back
    return None


class SyncCounter(TorchDispatchMode):
    """Counts would-be host syncs made from code under `roots`, by call site."""

    def __init__(self, roots: tuple[str, ...] = PROJECT):
        super().__init__()
        self.roots = roots
        self.sites: Counter[str] = Counter()
        self._patches: list[tuple[str, object]] = []

    def _hit(self, what: str) -> None:
        site = _caller(self.roots)
        if site is not None:
            self.sites[f"{site} ({what})"] += 1

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        data_dependent = (
            func in SYNC_OPS
            or (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None)
            or (func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default)
                and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None))
        )
        if data_dependent:
            self._hit(func.__name__)
        return func(*args, **kwargs)

    def __enter__(self):
        # host reads that never reach the dispatcher on CPU tensors
        for name in ("tolist", "cpu", "numpy"):
            real = getattr(torch.Tensor, name)

            def wrapper(t, *a, _real=real, _name=name, **k):
                self._hit(_name)
                return _real(t, *a, **k)

            self._patches.append((name, real))
            setattr(torch.Tensor, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._patches:
            setattr(torch.Tensor, name, real)
        self._patches.clear()
        return super().__exit__(*exc)


def test_the_counter_sees_every_kind_of_sync() -> None:
    t = torch.arange(6.0)
    here = (os.path.abspath(__file__),)
    with SyncCounter(roots=here + PROJECT) as c:
        _ = torch.ones(3) + 1  # an ordinary op: no sync
    assert c.total == 0

    def make_syncs(t):
        return [t.sum().item(), int(t[0]), float(t[1]), bool(t[2] > 0), t.tolist(), t[t > 2], t.nonzero(), t.cpu()]

    make_syncs.__code__ = make_syncs.__code__.replace(co_filename=os.path.join(ROOT, "engine", "fake.py"))
    with SyncCounter() as c:
        make_syncs(t)
    assert c.total == 8, c.sites
    with SyncCounter() as c, torch.inference_mode():  # the model's forward runs in inference mode
        make_syncs(torch.arange(6.0))
    assert c.total == 8, c.sites


def _examples() -> list[ClassificationExample]:
    return [ClassificationExample(f"{FEW_SHOT}Headline: {h}\nTopic:",
                                  [" sports news", " world politics"] if i % 2 else [" business", " sport"], i % 2)
            for i, h in enumerate(HEADLINES[:2])]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_mezo_step_syncs_once(kernels, mode, kernel_device) -> None:
    eng = make_engine(kernels=kernels, device=kernel_device)
    trainer = MeZOTrainer(eng, MeZOConfig(mode=mode, eps=1e-2, lr=1e-4, seed=2))
    if mode == "lora":
        randomize_lora_b(eng)
    encoded = trainer.encode(_examples())
    with SyncCounter() as counter:
        record = trainer.step(encoded)
    assert not record["skipped"] and record["tokens_computed"] > 0
    # exactly one: the logged loss and projected gradients, read together
    assert counter.total == 1, dict(counter.sites)
    assert all("mezo/trainer.py" in site for site in counter.sites), dict(counter.sites)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_no_cuda_sync_in_the_branches_or_the_update(mode) -> None:
    """Both branches' forward passes and the in-place update run with CUDA's sync debugger set to
    raise; the whole step then syncs at most once (one warning)."""
    import warnings

    eng = make_engine(device="cuda")
    trainer = MeZOTrainer(eng, MeZOConfig(mode=mode, eps=1e-2, lr=1e-4, seed=2))
    encoded = trainer.encode(_examples())
    trainer.step(encoded)  # warm-up: kernel compilation and first-touch allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plus, minus = trainer.branch_losses(encoded, seed=123)
        trainer.apply_update([123], ((plus - minus) / 2e-2).reshape(1), 1e-4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.step(encoded)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
