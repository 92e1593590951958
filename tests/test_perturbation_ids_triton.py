"""Per-row perturbation ids in the fused Triton kernels (issue 14), in the interpreter on CPU: a mixed
launch (4 ids × ± × σ = 0 rows) equals the torch twin and every row equals running it alone at
θ + σ ε_p Z_p; noise tiles are generated once per (program, id present among its σ != 0 rows)."""
from __future__ import annotations

import pytest
import torch

import kernels.lora as lora
from kernels import noisy_lora_linear, randn
from kernels.launch_config import LoraDownConfig, NoisyLinearConfig
from kernels.lora_tables import perturbation_tables


@pytest.fixture
def device(kernel_device: str) -> str:
    return kernel_device


P = 4
SEEDS_A, SEEDS_B, SEEDS_W = [101, 202, 2**40 + 303, 404], [11, 2**63 - 22, 33, 44], [7, 8, 9, 2**35 + 10]
EPS = [1e-2, 2e-2, 5e-3, 3e-2]
SCALE = 2.0
BLOCK_M = 16  # small row tiles, so that a 37-row launch has 3 programs and ids straddle tile edges


@pytest.fixture
def small_tiles(monkeypatch):
    """16-row tiles (the interpreter's default puts every row of these tiny launches in one tile) and a
    two-trip LoRA epilogue at r 16; otherwise the CUDA-like shapes of the real configs."""
    monkeypatch.setattr(lora, "lora_down_config",
                        lambda m, k, r, dt, tgt: LoraDownConfig(BLOCK_M, 32, max(16, 1 << (r - 1).bit_length()), 4, 1))
    monkeypatch.setattr(lora, "noisy_linear_config",
                        lambda m, n, k, r, xd, wd, wn, tgt: NoisyLinearConfig(BLOCK_M, 32, 32, 2, 8, False, 4, 1))


def _problem(m, k, n, r, device, ids_layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    a = torch.randn(r, k, generator=g) / k**0.5 if r else None
    b = torch.randn(n, r, generator=g) / r**0.5 if r else None
    bias = torch.randn(n, generator=g)
    signs = torch.tensor([(1.0, -1.0, 0.0)[i % 3] for i in range(m)])
    if ids_layout == "interleaved":
        ids = torch.tensor([(i * 7) % P for i in range(m)], dtype=torch.int32)
    else:  # grouped as a scheduler would: runs of 9 rows per id, so tiles of 16 straddle two ids
        ids = torch.tensor([min(i // 9, P - 1) for i in range(m)], dtype=torch.int32)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(x=mv(x), weight=mv(w), lora_a=mv(a), lora_b=mv(b), bias=mv(bias), signs=mv(signs), ids=mv(ids))


def _run(p, impl, full, **over):
    kw = dict(signs=p["signs"], seed_a=SEEDS_A, seed_b=SEEDS_B, eps=EPS, scale=SCALE, bias=p["bias"],
              weight_seed=SEEDS_W if full else None, perturbation_ids=p["ids"], impl=impl)
    kw.update(over)
    return noisy_lora_linear(p["x"], p["weight"], p["lora_a"], p["lora_b"], **kw)


def _row_alone(p, i, full):
    """Row i at explicitly perturbed θ + σ_i ε_{p_i} Z_{p_i} (float64: a sharp oracle)."""
    x = p["x"][i:i + 1].double().cpu()
    s, q = float(p["signs"][i]), int(p["ids"][i])
    e = s * EPS[q]
    w = p["weight"].double().cpu()
    if full:
        w = w + e * randn(SEEDS_W[q], w.shape).double()
    y = x @ w.t() + p["bias"].double().cpu()
    if p["lora_a"] is not None:
        a = p["lora_a"].double().cpu() + e * randn(SEEDS_A[q], p["lora_a"].shape).double()
        b = p["lora_b"].double().cpu() + e * randn(SEEDS_B[q], p["lora_b"].shape).double()
        y = y + SCALE * (x @ a.t()) @ b.t()
    return y


CASES = [(4, False, "interleaved"), (16, False, "grouped"), (4, True, "grouped"), (0, True, "interleaved")]


@pytest.mark.parametrize("r,full,layout", CASES, ids=[f"r{r}-{'full' if f else 'lora'}-{lay}" for r, f, lay in CASES])
def test_mixed_launch_matches_twin_and_rows_alone(small_tiles, device, r, full, layout):
    p = _problem(37, 40, 24, r, device, layout)
    got = _run(p, "triton", full)
    ref = _run(p, "torch", full)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    alone = torch.cat([_row_alone(p, i, full) for i in range(p["x"].shape[0])])
    torch.testing.assert_close(got.double().cpu(), alone, rtol=1e-5, atol=1e-5)


def test_one_id_changes_only_its_rows(small_tiles, device):
    """Another seed for perturbation 2 moves exactly the σ != 0 rows of id 2; every other row is
    bit-identical (rows of one tile never see another id's noise)."""
    p = _problem(37, 40, 24, 4, device, "interleaved")
    base = _run(p, "triton", True)
    seeds = list(SEEDS_A), list(SEEDS_B), list(SEEDS_W)
    for s in seeds:
        s[2] += 1
    moved = _run(p, "triton", True, seed_a=seeds[0], seed_b=seeds[1], weight_seed=seeds[2])
    changed = (moved != base).any(dim=1)
    want = (p["ids"] == 2) & (p["signs"] != 0)
    assert torch.equal(changed, want)


def test_sigma_zero_launch_is_the_plain_linear_and_draws_no_noise(small_tiles, device, monkeypatch):
    p = _problem(37, 40, 24, 16, device, "interleaved")
    p["signs"] = torch.zeros_like(p["signs"])
    calls = _count_randn(monkeypatch)
    got = _run(p, "triton", True)
    assert calls == []  # no program had an active row: no noise tile at all
    plain = p["x"] @ p["weight"].t() + p["bias"] + SCALE * (p["x"] @ p["lora_a"].t()) @ p["lora_b"].t()
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def _count_randn(monkeypatch) -> list:
    """Seeds of every tl.randn tile the interpreter generates from now on."""
    import triton.language as tl

    calls, real = [], tl.randn

    def counting(seed, offset, *args, **kwargs):
        calls.append(int(seed))
        return real(seed, offset, *args, **kwargs)

    monkeypatch.setattr(tl, "randn", counting)
    return calls


def test_noise_tiles_once_per_program_and_id_present(small_tiles, device, monkeypatch):
    """m 40 = tiles [0, 16), [16, 32), [32, 40); ids 0 on rows < 20, 3 above, σ = 0 on rows 8-15 and
    on tile 3, so the programs hold ids {0}, {0, 3}, {} (ids 1 and 2, inside [0, 3], are skipped)."""
    m, k, n, r = 40, 40, 24, 4
    p = _problem(m, k, n, r, device, "grouped")
    p["ids"] = torch.tensor([0 if i < 20 else 3 for i in range(m)], dtype=torch.int32, device=device)
    p["signs"] = torch.tensor([0.0 if 8 <= i < 16 or i >= 32 else (1.0, -1.0)[i % 2] for i in range(m)],
                              device=device)
    calls = _count_randn(monkeypatch)
    got = _run(p, "triton", True)
    k_steps, n_tiles = -(-k // 32), -(-n // 32)
    want = {SEEDS_A[0]: 2 * k_steps, SEEDS_A[3]: k_steps,  # down kernel: per program, per K step
            SEEDS_W[0]: 2 * n_tiles * k_steps, SEEDS_W[3]: n_tiles * k_steps,  # per (program, K step)
            SEEDS_B[0]: 2 * n_tiles, SEEDS_B[3]: n_tiles}  # one rank chunk (r 4 <= 8)
    assert {s: calls.count(s) for s in set(calls)} == want
    torch.testing.assert_close(got, _run(p, "torch", True), rtol=1e-5, atol=1e-5)


def test_one_perturbation_through_ids_equals_the_old_call(device):
    """P = 1 with explicit zero ids (and one-entry lists) is the same launch as the int call."""
    p = _problem(37, 40, 24, 8, device, "interleaved")
    kw = dict(signs=p["signs"], scale=SCALE, bias=p["bias"], impl="triton")
    old = noisy_lora_linear(p["x"], p["weight"], p["lora_a"], p["lora_b"], seed_a=5, seed_b=6, eps=1e-2,
                            weight_seed=7, **kw)
    new = noisy_lora_linear(p["x"], p["weight"], p["lora_a"], p["lora_b"], seed_a=[5], seed_b=[6], eps=[1e-2],
                            weight_seed=[7], perturbation_ids=torch.zeros(37, dtype=torch.int64, device=device), **kw)
    assert torch.equal(new, old)
    twin = noisy_lora_linear(p["x"], p["weight"], p["lora_a"], p["lora_b"], seed_a=5, seed_b=6, eps=1e-2,
                             weight_seed=7, **{**kw, "impl": "torch"})
    torch.testing.assert_close(old, twin, rtol=1e-5, atol=1e-5)


def test_device_tables_equal_host_tables(device):
    """Seeds / ε as tensors on the launch's device are read in place and give the same launch."""
    p = _problem(20, 40, 24, 4, device, "interleaved")
    host = _run(p, "triton", True)
    dev = _run(p, "triton", True, seed_a=torch.tensor(SEEDS_A, device=device),
               seed_b=torch.tensor([s - 2**64 if s >= 2**63 else s for s in SEEDS_B], device=device),
               weight_seed=torch.tensor(SEEDS_W, device=device), eps=torch.tensor(EPS, device=device))
    assert torch.equal(dev, host)


def test_tables_broadcast_and_alignment():
    tabs = perturbation_tables(3, [1, 2, 3], 0.5, None, torch.device("cpu"))
    assert tabs.num == 3 and tabs.seed_a[:3].tolist() == [3, 3, 3] and tabs.seed_b[:3].tolist() == [1, 2, 3]
    assert tabs.eps[:3].tolist() == [0.5] * 3 and tabs.seed_w[:3].tolist() == [0, 0, 0]
    # every table starts 16-byte aligned whatever P is (one Triton specialization for all P)
    assert all(t.data_ptr() % 16 == 0 for t in (tabs.seed_a, tabs.seed_b, tabs.seed_w, tabs.eps))
    assert perturbation_tables(2**64 - 1, 0, 1.0, None, torch.device("cpu")).seed_a[0].item() == -1  # same bits


def test_bad_ids_are_refused(device):
    p = _problem(8, 40, 24, 4, device, "interleaved")
    with pytest.raises(ValueError, match="perturbation_ids"):
        _run(p, "triton", False, perturbation_ids=None)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        _run(p, "triton", False, perturbation_ids=torch.full((8,), 4))
    with pytest.raises(ValueError, match="8 rows"):
        _run(p, "triton", False, perturbation_ids=torch.zeros(7, dtype=torch.int32))
    with pytest.raises(TypeError, match="integer"):
        _run(p, "triton", False, perturbation_ids=torch.zeros(8))
    with pytest.raises(ValueError, match="lengths"):
        _run(p, "triton", False, seed_a=[1, 2, 3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 tensor-core paths need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r,full", [(8, False), (0, True), (64, True)])
def test_low_precision_mixed_launch_on_gpu(dtype, r, full):
    """The real CUDA tiles (64/128-row programs) with 4 ids interleaved and grouped, against the twin."""
    for layout in ("interleaved", "grouped"):
        p = _problem(300, 576, 1000, r, "cuda", layout)
        p = {k: (v.to(dtype) if k in ("x", "weight", "bias") else v) for k, v in p.items()}
        ref = _run(p, "torch", full)
        got = _run(p, "triton", full)
        rel = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(got, ref, rtol=rel, atol=rel * 0.2 * float(ref.float().abs().max()))
