"""Fused noisy LoRA linear vs the torch reference, and the reference vs explicit θ ± εZ (DESIGN.md 5)."""
import pytest
import torch

from kernels import noisy_lora_linear, randn
from kernels.lora import lora_noise


@pytest.fixture
def device(kernel_device: str) -> str:
    """Kernel tests run where the Triton kernels can: the GPU, else the interpreter on CPU."""
    return kernel_device


CUDA = torch.cuda.is_available()
SEED_A, SEED_B, SEED_W = 1234567, 2**31 - 1, 424242


def _tol(y_ref: torch.Tensor) -> dict:
    """Tolerances keyed by output dtype; absolute part scaled by the output's magnitude."""
    ymax = y_ref.float().abs().max().item() + 1e-6
    rel = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[y_ref.dtype]
    return dict(rtol=rel, atol=rel * 0.2 * ymax)


def _problem(m, k, n, r, device, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    a = torch.randn(r, k, generator=g) / k**0.5 if r else None
    b = torch.randn(n, r, generator=g) if r else None
    bias_t = torch.randn(n, generator=g) if bias else None
    signs = torch.tensor([(-1, 0, 1)[i % 3] for i in torch.randperm(m, generator=g).tolist()], dtype=torch.float32)
    move = lambda t, dt=None: None if t is None else t.to(device=device, dtype=dt or t.dtype)  # noqa: E731
    return dict(x=move(x, dtype), weight=move(w, dtype), lora_a=move(a), lora_b=move(b),
                bias=move(bias_t, dtype), signs=move(signs))


def _run(p, impl, *, eps=1e-2, scale=2.0, weight_seed=None, **over):
    kw = {**p, **over}
    return noisy_lora_linear(kw.pop("x"), kw.pop("weight"), kw.pop("lora_a"), kw.pop("lora_b"),
                             seed_a=SEED_A, seed_b=SEED_B, eps=eps, scale=scale, weight_seed=weight_seed,
                             impl=impl, **kw)


def _explicit(p, eps, scale, weight_seed=None):
    """The contract: row i runs at W + σεZ_W, A + σεZ_A, B + σεZ_B, computed tensor by tensor."""
    x, w, a, b, bias, signs = (p[k] for k in ("x", "weight", "lora_a", "lora_b", "bias", "signs"))
    xf = x.float()
    y = torch.empty(x.shape[0], w.shape[0], device=x.device)
    for s in (-1.0, 0.0, 1.0):
        rows = signs == s
        w_s = w.float() + (s * eps * randn(weight_seed, w.shape, device=x.device) if weight_seed is not None else 0)
        y_s = xf[rows] @ w_s.t() + (bias.float() if bias is not None else 0)
        if a is not None:
            z_a, z_b = lora_noise(SEED_A, SEED_B, a.shape, b.shape, device=x.device)
            y_s = y_s + scale * (xf[rows] @ (a + s * eps * z_a).t()) @ (b + s * eps * z_b).t()
        y[rows] = y_s
    return y.to(x.dtype)


# every listed M, K, N and r appears; full-weight cases are few because Z_W tiles dominate interpreter time
LORA_CASES = [(1, 64, 576, 8), (7, 576, 1000, 1), (64, 1000, 64, 64), (300, 1000, 576, 8), (300, 64, 1000, 64)]
FULL_CASES = [(7, 64, 576, None), (300, 64, 1000, None), (64, 576, 64, 8)]


@pytest.mark.parametrize("m,k,n,r", LORA_CASES)
def test_triton_matches_reference_lora(m, k, n, r, device):
    p = _problem(m, k, n, r, device, bias=m % 2 == 1)
    ref = _run(p, "torch")
    got = _run(p, "triton")
    torch.testing.assert_close(got, ref, **_tol(ref))
    # the noise is visible at this tolerance: a wrong seed must fail the same comparison
    wrong = noisy_lora_linear(p["x"], p["weight"], p["lora_a"], p["lora_b"], signs=p["signs"], seed_a=SEED_A + 1,
                              seed_b=SEED_B, eps=1e-2, scale=2.0, bias=p["bias"], impl="triton")
    if (p["signs"] != 0).any():
        assert not torch.allclose(wrong, ref, **_tol(ref))


@pytest.mark.parametrize("m,k,n,r", FULL_CASES)
def test_triton_matches_reference_full_weight(m, k, n, r, device):
    p = _problem(m, k, n, r, device, bias=r is None)
    ref = _run(p, "torch", weight_seed=SEED_W)
    got = _run(p, "triton", weight_seed=SEED_W)
    torch.testing.assert_close(got, ref, **_tol(ref))


@pytest.mark.parametrize("weight_seed", [None, SEED_W])
def test_reference_is_theta_plus_sigma_eps_z(weight_seed, device):
    p = _problem(30, 96, 80, 8, device)
    for eps, scale in [(1e-2, 2.0), (0.5, 0.25)]:
        want = _explicit(p, eps, scale, weight_seed)
        for impl in ("torch", "triton"):
            got = _run(p, impl, eps=eps, scale=scale, weight_seed=weight_seed)
            torch.testing.assert_close(got, want, **_tol(want))


def test_full_parameter_mode_without_lora_is_theta_plus_sigma_eps_z(device):
    p = _problem(21, 80, 48, None, device)
    want = _explicit(p, 0.1, 1.0, SEED_W)
    for impl in ("torch", "triton"):
        torch.testing.assert_close(_run(p, impl, eps=0.1, weight_seed=SEED_W), want, **_tol(want))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_sign_zero_rows_are_plain_lora(impl, device):
    p = _problem(40, 64, 96, 8, device)
    y = _run(p, impl, eps=0.3, weight_seed=SEED_W)
    plain = p["x"] @ p["weight"].t() + p["bias"] + 2.0 * (p["x"] @ p["lora_a"].t()) @ p["lora_b"].t()
    zero = p["signs"] == 0
    torch.testing.assert_close(y[zero], plain[zero], **_tol(plain))
    assert not torch.allclose(y[~zero], plain[~zero], **_tol(plain))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_eps_zero_makes_both_branches_equal(impl, device):
    p = _problem(24, 64, 64, 8, device)
    y = _run(p, impl, eps=0.0, weight_seed=SEED_W)
    y0 = _run(p, impl, eps=0.0, weight_seed=SEED_W, signs=torch.zeros_like(p["signs"]))
    assert torch.equal(y, y0)


def test_signs_dtype_leading_dims_and_strides(device):
    p = _problem(10, 64, 48, 8, device)
    ref = _run(p, "torch")
    x3 = p["x"].reshape(2, 5, 64)
    got = _run(p, "triton", x=x3, signs=p["signs"].to(torch.int64)).reshape(10, 48)
    torch.testing.assert_close(got, ref, **_tol(ref))
    x_strided = torch.zeros(10, 128, device=device)[:, ::2]
    x_strided.copy_(p["x"])
    w_t = p["weight"].t().contiguous().t()  # column-major weight
    got = _run(p, "triton", x=x_strided, weight=w_t)
    torch.testing.assert_close(got, ref, **_tol(ref))


def test_bad_inputs(device):
    p = _problem(4, 64, 32, 8, device)
    with pytest.raises(ValueError):
        _run(p, "triton", signs=p["signs"][:3])
    with pytest.raises(ValueError):
        _run(p, "torch", signs=p["signs"][:3])
    with pytest.raises(ValueError):
        _run(p, "triton", lora_b=p["lora_b"][:, :4])
    with pytest.raises(ValueError):
        _run(p, "bogus")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16/fp16 tensor-core paths need a GPU (the interpreter has no bf16 dot)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n,r,weight_seed", [(7, 576, 1000, 8, None), (300, 1000, 576, 64, None),
                                                 (64, 576, 1000, 8, SEED_W), (1, 4096, 4096, 64, SEED_W)])
def test_low_precision_on_gpu(dtype, m, k, n, r, weight_seed):
    p = _problem(m, k, n, r, "cuda", dtype=dtype)
    ref = _run(p, "torch", weight_seed=weight_seed)
    got = _run(p, "triton", weight_seed=weight_seed)
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref, **_tol(ref))
