"""zo_update_: p ← p − lr·(Σ_k g_k z_k + wd·p) with z_k regenerated from seeds (DESIGN.md section 5)."""
import os

import pytest
import torch

from kernels import derive_seed, randn, zo_update_


@pytest.fixture
def device(kernel_device: str) -> str:
    """Kernel tests run where the Triton kernels can: the GPU, else the interpreter on CPU."""
    return kernel_device


CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _tol(lr, grads) -> dict:
    """1e-6 under the interpreter; compiled tl.randn may differ from the torch twin by up to ~1e-4 (rarely)."""
    slack = 0.0 if INTERPRETED else 1e-4 * abs(lr) * sum(abs(g) for g in grads)
    return dict(rtol=1e-6, atol=1e-6 + slack)


def _explicit(p, seeds, grads, lr, wd):
    z = sum(float(g) * randn(s, p.shape, device=p.device) for s, g in zip(seeds, grads))
    return p - lr * (z + wd * p)


CASES = [
    ((3, 7, 5), [derive_seed(10, 0)], [0.75], 1e-2, 0.0),
    ((1000,), [5, 2**31 - 1, derive_seed(3, 2)], [0.5, -1.25, 2.0], 1e-3, 0.1),
    ((33, 17), [derive_seed(s, 1) for s in range(6)], [0.1, -0.2, 0.3, -0.4, 0.5, -0.6], 0.5, 0.01),
    ((16, 4), [2**40 + 1, 0], [3.0, -3.0], 1.0, 0.0),
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("shape,seeds,grads,lr,wd", CASES)
def test_matches_explicit_formula(impl, shape, seeds, grads, lr, wd, device):
    p0 = torch.randn(shape, generator=torch.Generator().manual_seed(len(seeds))).to(device)
    want = _explicit(p0, seeds, grads, lr, wd)
    p = p0.clone()
    out = zo_update_(p, seeds, torch.tensor(grads, device=device), lr, weight_decay=wd, impl=impl)
    assert out is p
    torch.testing.assert_close(p, want, **_tol(lr, grads))


@pytest.mark.parametrize("shape,seeds,grads,lr,wd", CASES)
def test_triton_matches_torch(shape, seeds, grads, lr, wd, device):
    p0 = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device)
    a, b = p0.clone(), p0.clone()
    g = torch.tensor(grads, device=device)
    zo_update_(a, seeds, g, lr, wd, impl="torch")
    zo_update_(b, torch.tensor(seeds, dtype=torch.int64, device=device), g, lr, wd, impl="triton")
    torch.testing.assert_close(a, b, **_tol(lr, grads))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_update_then_inverse_update_restores(impl, device):
    """The MeZO perturbation pattern: +εz then −εz (lr = ∓1, g = ε) is the identity up to rounding."""
    p0 = torch.randn(50, 20, device=device)
    p = p0.clone()
    zo_update_(p, [77], torch.tensor([1e-3], device=device), -1.0, impl=impl)
    assert not torch.equal(p, p0)
    zo_update_(p, [77], torch.tensor([1e-3], device=device), 1.0, impl=impl)
    torch.testing.assert_close(p, p0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_weight_decay_only_and_non_contiguous(impl, device):
    base = torch.randn(20, 30, device=device)
    p = base.t()  # non-contiguous view: noise index is still the row-major index of p's own shape
    want = _explicit(p.clone(), [9], [0.5], 0.1, 0.2)
    zo_update_(p, [9], torch.tensor([0.5], device=device), 0.1, 0.2, impl=impl)
    torch.testing.assert_close(p, want, **_tol(0.1, [0.5]))
    q = torch.ones(8, device=device)
    zo_update_(q, [], torch.zeros(0, device=device), 0.5, 0.1, impl=impl)
    torch.testing.assert_close(q, torch.full((8,), 0.95, device=device))


def test_bad_inputs(device):
    p = torch.zeros(4, device=device)
    with pytest.raises(ValueError):
        zo_update_(p, [1, 2], torch.ones(1, device=device), 0.1, impl="triton")
    with pytest.raises(TypeError):
        zo_update_(p.half(), [1], torch.ones(1, device=device), 0.1)
    with pytest.raises(ValueError):
        zo_update_(p, [1], torch.ones(1, device=device), 0.1, impl="bogus")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="host-sync check needs CUDA")
def test_triton_path_never_syncs_the_host():
    p = torch.randn(1 << 20, device="cuda")
    seeds = torch.tensor([derive_seed(1, i) for i in range(4)], dtype=torch.int64, device="cuda")
    g = torch.randn(4, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        zo_update_(p, seeds, g, 1e-3, 0.01, impl="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
