"""KVPool: page bookkeeping (alloc / refcounts / misuse) and K/V data movement."""
import pytest
import torch

from engine.kv_pool import KVPool


def make_pool(num_pages: int = 8, page_size: int = 4, layers: int = 2, device: str = "cpu") -> KVPool:
    return KVPool(num_layers=layers, num_pages=num_pages, page_size=page_size, num_kv_heads=2, head_dim=3,
                  dtype=torch.float32, device=device)


def test_shapes_and_null_page(device):
    pool = make_pool(device=device)
    assert len(pool.k_pools) == len(pool.v_pools) == 2
    assert pool.k_pools[0].shape == (8, 4, 2, 3)
    assert pool.num_usable_pages == 7 == pool.num_free_pages
    assert torch.count_nonzero(pool.k_pools[0][0]) == 0  # NULL page is zeros: safe to read when padded
    pages = pool.alloc(7)
    assert pages is not None and sorted(pages) == list(range(1, 8))  # page 0 never handed out
    pool.check_invariants()


def test_alloc_free_roundtrip():
    pool = make_pool()
    a = pool.alloc(3)
    assert a == [1, 2, 3] and all(pool.refcount(p) == 1 for p in a)
    assert pool.num_free_pages == 4 and pool.num_used_pages == 3
    pool.incref([a[0], a[0]])
    assert pool.refcount(a[0]) == 3
    assert pool.decref(a) == 2  # a[0] still held twice
    assert pool.decref([a[0], a[0]]) == 1
    assert pool.num_free_pages == 7
    assert pool.alloc(0) == []
    pool.check_invariants()


def test_exhaustion_returns_none_without_side_effects():
    pool = make_pool(num_pages=4)
    held = pool.alloc(2)
    assert pool.alloc(2) is None
    assert pool.num_free_pages == 1 and [pool.refcount(p) for p in held] == [1, 1]
    pool.check_invariants()
    assert pool.alloc(1) is not None and pool.alloc(1) is None
    with pytest.raises(ValueError):
        pool.alloc(-1)


def test_double_free_and_misuse_raise():
    pool = make_pool()
    (p,) = pool.alloc(1)
    assert pool.decref([p]) == 1
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref([p])
    q, r = pool.alloc(2)
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref([q, r, q])  # duplicate within one call
    assert pool.refcount(q) == 1 and pool.refcount(r) == 1  # rejected call changed nothing
    with pytest.raises(RuntimeError, match="free"):
        pool.incref([7])  # never allocated
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref([7])
    with pytest.raises(ValueError, match="NULL"):
        pool.incref([0])
    with pytest.raises(ValueError, match="NULL"):
        pool.decref([0])
    for bad in (8, -1, 100):
        with pytest.raises(ValueError, match="out of range"):
            pool.decref([bad])
        with pytest.raises(ValueError, match="out of range"):
            pool.refcount(bad)
    pool.check_invariants()


def test_check_invariants_detects_corruption():
    pool = make_pool()
    pool.alloc(2)
    pool._free.append(pool._free[-1])  # duplicate in free list
    with pytest.raises(AssertionError):
        pool.check_invariants()
    pool = make_pool()
    (p,) = pool.alloc(1)
    pool._refcount[p] = 0  # leaked page: neither free nor referenced
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_write_and_copy_slots(device):
    pool = make_pool(page_size=4, device=device)
    src, dst = pool.alloc(2)
    T = 6  # all of src and the first two slots of dst
    slots = torch.tensor([src * 4 + i for i in range(4)] + [dst * 4, dst * 4 + 1], device=device)
    k = torch.arange(T * 6, dtype=torch.float32, device=device).view(T, 2, 3)
    v = -k
    for layer in range(2):
        pool.write(layer, slots, k + layer, v - layer)
    for layer in range(2):
        assert torch.equal(pool.k_pools[layer][src], (k + layer)[:4])
        assert torch.equal(pool.v_pools[layer][dst, :2], (v - layer)[4:])
        assert torch.count_nonzero(pool.k_pools[layer][dst, 2:]) == 0
        assert torch.count_nonzero(pool.k_pools[layer][0]) == 0
    before = pool.k_pools[1][dst, 3].clone()
    pool.copy_slots(src, dst, 3)
    for layer in range(2):
        assert torch.equal(pool.k_pools[layer][dst, :3], pool.k_pools[layer][src, :3])
        assert torch.equal(pool.v_pools[layer][dst, :3], pool.v_pools[layer][src, :3])
    assert torch.equal(pool.k_pools[1][dst, 3], before)  # slots past n_slots untouched
    with pytest.raises(ValueError):
        pool.copy_slots(src, dst, 5)
    pool.decref([src])
    with pytest.raises(RuntimeError, match="free"):
        pool.copy_slots(src, dst, 1)  # copying from an evicted page is a bug, not silent garbage
    with pytest.raises(ValueError):
        pool.write(0, slots, k[:, :1], v)


def test_write_casts_dtype():
    pool = KVPool(1, 3, 2, 1, 2, torch.bfloat16, "cpu")
    (p,) = pool.alloc(1)
    pool.write(0, torch.tensor([p * 2 + 1]), torch.ones(1, 1, 2), torch.full((1, 1, 2), 2.0))
    assert pool.k_pools[0].dtype == torch.bfloat16 and pool.v_pools[0][p, 1].tolist() == [[2.0, 2.0]]


def test_pages_for_budget():
    per_page = 2 * 3 * 16 * 4 * 64 * 2  # K+V, layers, page_size, heads, head_dim, bf16 bytes
    assert KVPool.page_bytes(3, 16, 4, 64, torch.bfloat16) == per_page
    # usable pages: the NULL page is paid for out of the same budget
    assert KVPool.pages_for_budget(per_page * 10, 3, 16, 4, 64, torch.bfloat16) == 9
    assert KVPool.pages_for_budget(per_page * 10 - 1, 3, 16, 4, 64, torch.bfloat16) == 8
    assert KVPool.pages_for_budget(per_page * 10, 3, 16, 4, 64, torch.float32) == 4
    assert KVPool.pages_for_budget(per_page, 3, 16, 4, 64, torch.bfloat16) == 0
    n = KVPool.pages_for_budget(per_page * 10, 3, 16, 4, 64, torch.bfloat16)
    pool = KVPool(3, 1 + n, 16, 4, 64, torch.bfloat16, "cpu")
    assert pool.num_usable_pages == n
    used = sum(t.numel() * t.element_size() for t in pool.k_pools + pool.v_pools)
    assert used == per_page * 10
    with pytest.raises(ValueError, match="num_pages"):
        KVPool(3, 1 + KVPool.pages_for_budget(per_page, 3, 16, 4, 64, torch.bfloat16), 16, 4, 64,
               torch.bfloat16, "cpu")
    with pytest.raises(ValueError):
        KVPool.pages_for_budget(-1, 3, 16, 4, 64, torch.bfloat16)
