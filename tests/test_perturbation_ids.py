"""Per-row perturbation ids in the noisy LoRA linear (issue 14): every row equals running it alone at
θ + σ ε_p Z_p with explicitly perturbed weights."""
from __future__ import annotations

import pytest
import torch

from kernels import noisy_lora_linear, randn
from kernels.lora_ref import perturbation_table, rows_by_perturbation

P = 4
SEEDS_A, SEEDS_B, SEEDS_W = [101, 202, 303, 404], [11, 22, 33, 44], [7, 8, 9, 10]
EPS = [1e-2, 2e-2, 5e-3, 1e-2]


def _inputs(m=24, k=40, n=24, r=4, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) / r**0.5
    signs = torch.tensor([(1.0, -1.0, 0.0)[i % 3] for i in range(m)])
    ids = torch.tensor([(i * 7) % P for i in range(m)], dtype=torch.int32)
    return x, w, a, b, signs, ids


def _explicit_row(x, w, a, b, sign, p, scale, full):
    """Row x at explicitly perturbed weights (float64 for a sharp oracle)."""
    e = sign * EPS[p]
    if full:
        wp = w.double() + e * randn(SEEDS_W[p], w.shape).double()
        return x.double() @ wp.t()
    ap = a.double() + e * randn(SEEDS_A[p], a.shape).double()
    bp = b.double() + e * randn(SEEDS_B[p], b.shape).double()
    return x.double() @ w.double().t() + scale * (x.double() @ ap.t()) @ bp.t()


@pytest.mark.parametrize("full", [False, True])
def test_mixed_launch_equals_rows_alone(full):
    x, w, a, b, signs, ids = _inputs()
    scale = 2.0
    kw = dict(signs=signs, seed_a=SEEDS_A, seed_b=SEEDS_B, eps=EPS, scale=scale, perturbation_ids=ids,
              impl="torch")
    if full:
        y = noisy_lora_linear(x, w, None, None, weight_seed=SEEDS_W, **kw)
    else:
        y = noisy_lora_linear(x, w, a, b, **kw)
    for i in range(x.shape[0]):
        ref = _explicit_row(x[i:i + 1], w, a, b, float(signs[i]), int(ids[i]), scale, full)
        torch.testing.assert_close(y[i:i + 1].double(), ref, rtol=1e-5, atol=1e-5)


def test_one_perturbation_matches_the_two_branch_launch():
    """P = 1 through ids equals the id-less call (the launch MeZO ran before ids existed)."""
    x, w, a, b, signs, _ = _inputs()
    base = noisy_lora_linear(x, w, a, b, signs=signs, seed_a=5, seed_b=6, eps=1e-2, scale=2.0, impl="torch")
    with_ids = noisy_lora_linear(x, w, a, b, signs=signs, seed_a=[5], seed_b=[6], eps=[1e-2], scale=2.0,
                                 perturbation_ids=torch.zeros(x.shape[0], dtype=torch.int32), impl="torch")
    torch.testing.assert_close(with_ids, base, rtol=1e-6, atol=1e-6)


def test_precomputed_rows_equal_derived_rows():
    x, w, a, b, signs, ids = _inputs()
    kw = dict(signs=signs, seed_a=SEEDS_A, seed_b=SEEDS_B, eps=EPS, scale=2.0, perturbation_ids=ids, impl="torch")
    rows = rows_by_perturbation(signs, ids, P)
    assert sum(r.numel() for r in rows) == int((signs != 0).sum())
    assert torch.equal(noisy_lora_linear(x, w, a, b, rows_by_id=rows, **kw), noisy_lora_linear(x, w, a, b, **kw))


def test_inconsistent_tables_are_refused():
    with pytest.raises(ValueError, match="lengths"):
        perturbation_table([1, 2], [1, 2, 3], 1e-2)
    x, w, a, b, signs, _ = _inputs()
    with pytest.raises(ValueError, match="perturbation_ids"):
        noisy_lora_linear(x, w, a, b, signs=signs, seed_a=[1, 2], seed_b=[3, 4], eps=1e-2, scale=1.0, impl="torch")


def test_reference_refuses_bad_ids_like_the_kernel():
    """The torch twin checks ids as the Triton path does (a ValueError naming the range, not an IndexError)."""
    x, w, a, b, signs, ids = _inputs()
    kw = dict(signs=signs, seed_a=SEEDS_A, seed_b=SEEDS_B, eps=EPS, scale=1.0, impl="torch")
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\), got values in \[0, 4\]"):
        noisy_lora_linear(x, w, a, b, perturbation_ids=torch.where(torch.arange(24) == 5, 4, ids), **kw)
    with pytest.raises(ValueError, match="24 rows"):
        noisy_lora_linear(x, w, a, b, perturbation_ids=ids[:-1], **kw)
    with pytest.raises(TypeError, match="integer"):
        noisy_lora_linear(x, w, a, b, perturbation_ids=ids.float(), **kw)


def test_reference_eps_table_is_the_cached_launch_table():
    """The twin's per-row ε comes from the value-keyed launch tables (one queued copy per distinct
    table on a GPU, not a blocking copy per layer): a repeated launch makes no new table."""
    import kernels.lora_tables as lt

    x, w, a, b, signs, ids = _inputs()
    kw = dict(signs=signs, seed_a=SEEDS_A, seed_b=SEEDS_B, eps=[0.25, 0.5, 0.75, 1.0], scale=1.0,
              perturbation_ids=ids, impl="torch")
    noisy_lora_linear(x, w, a, b, **kw)
    before = lt._packed.cache_info()
    noisy_lora_linear(x, w, a, b, **kw)
    after = lt._packed.cache_info()
    assert after.hits > before.hits and after.misses == before.misses


def test_row_lists_are_built_only_for_the_torch_kernels(monkeypatch):
    """build_forward_batch keeps signs and ids on the host; the per-id row lists are built on the
    first torch-path layer that asks (once per pass), never on the Triton path."""
    import kernels
    from engine.forward_batch import PerturbationTable, build_forward_batch
    from engine.linear import AdaptableLinear

    fb = build_forward_batch("extend", [[1, 2, 3], [4, 5], [6], [7, 8]], [0, 0, 0, 0], [[1], [2], [3], [4]], 4,
                             [[2], [1], [0], [1]], "cpu", signs=[1.0, -1.0, 0.0, 1.0], perturbation_ids=[2, 0, 1, 2],
                             table=PerturbationTable((5, 6, 7), (1e-2, 1e-2, 1e-2)))
    pert = fb.perturbation
    assert pert._rows is None and pert.token_ids.tolist() == [2, 2, 2, 0, 0, 1, 2, 2]
    seen = []
    monkeypatch.setattr(kernels, "noisy_lora_linear", lambda *a, rows_by_id, **k: seen.append(rows_by_id) or a[0])
    lin = AdaptableLinear(4, 4, False, torch.float32)
    lin.set_lora(torch.zeros(2, 4), torch.zeros(4, 2), 1.0)
    lin.index_a, lin.index_b = 0, 1
    x = torch.zeros(8, 4)
    lin.kernels = "triton"
    lin(x, pert)
    assert seen == [None] and pert._rows is None
    lin.kernels = "torch"
    lin(x, pert)
    lin(x, pert)
    assert [r.tolist() for r in seen[1]] == [[3, 4], [], [0, 1, 2, 6, 7]]  # σ = 0 row 5 in none
    assert seen[2] is seen[1]
    derived = rows_by_perturbation(pert.token_signs, pert.token_ids, 3)
    assert all(torch.equal(r, d) for r, d in zip(seen[1], derived))
