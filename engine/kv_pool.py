"""Paged K/V storage shared by all requests and the radix prefix cache (DESIGN.md section 6).

Storage lives on the model's device; the page bookkeeping (free list, reference counts) lives in plain
Python lists on the host so that allocating and freeing never synchronises with the GPU.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch import Tensor

NULL_PAGE = 0  # reserved, never allocated; page tables are padded with it


class KVPool:
    """Paged K/V storage for all layers plus page bookkeeping (free list + reference counts).

    Ownership: every holder of a page (a request's page table, the radix tree) owns one reference.
    A page returns to the free list exactly when its count drops to 0; misuse raises instead of
    corrupting the pool, because a silent double free would let two requests share KV slots.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if num_pages < 2:
            raise ValueError(f"KVPool needs num_pages >= 2 (page 0 is the reserved NULL page), got {num_pages}")
        for name, val in (("num_layers", num_layers), ("page_size", page_size),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if val < 1:
                raise ValueError(f"KVPool: {name} must be >= 1, got {val}")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        # Zero-filled so the NULL page (read through padded page tables) never injects NaN/Inf.
        self.k_pools: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_pools: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._refcount: list[int] = [0] * num_pages
        # Stack; reversed so that the first allocation hands out page 1, 2, ... (deterministic, readable).
        self._free: list[int] = list(range(num_pages - 1, 0, -1))

    # ------------------------------------------------------------------ sizes
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_used_pages(self) -> int:
        """Pages with refcount > 0."""
        return self.num_usable_pages - len(self._free)

    @staticmethod
    def page_bytes(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one page costs across all layers, K and V together."""
        return 2 * num_layers * page_size * num_kv_heads * head_dim * dtype.itemsize

    @staticmethod
    def pages_for_budget(bytes_budget: int, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                         dtype: torch.dtype) -> int:
        """USABLE pages that fit in `bytes_budget` once the NULL page is paid for: pass 1 + this as num_pages.

        Counting usable pages means forgetting the +1 errs on the small side, never over budget. May be 0.
        """
        if bytes_budget < 0:
            raise ValueError(f"bytes_budget must be >= 0, got {bytes_budget}")
        total = int(bytes_budget) // KVPool.page_bytes(num_layers, page_size, num_kv_heads, head_dim, dtype)
        return max(total - 1, 0)

    # ------------------------------------------------------------- bookkeeping
    def _check_page(self, page: int, what: str) -> None:
        if page == NULL_PAGE:
            raise ValueError(f"KVPool.{what}: page 0 is the reserved NULL page and is never allocated")
        if not 0 < page < self.num_pages:
            raise ValueError(f"KVPool.{what}: page {page} out of range [1, {self.num_pages - 1}]")

    def alloc(self, n: int) -> list[int] | None:
        """`n` fresh pages with refcount 1, or None (and nothing allocated) if fewer are free."""
        if n < 0:
            raise ValueError(f"KVPool.alloc: n must be >= 0, got {n}")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:][::-1]
        del self._free[-n:]
        for p in pages:
            self._refcount[p] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Take one more reference on each page (a page listed twice gets two). Pages must be live."""
        pages = list(pages)
        for p in pages:  # validate everything first: an error leaves the pool untouched
            self._check_page(p, "incref")
            if self._refcount[p] == 0:
                raise RuntimeError(f"KVPool.incref: page {p} is free; only live pages can gain references")
        for p in pages:
            self._refcount[p] += 1

    def decref(self, pages: Iterable[int]) -> int:
        """Drop one reference per listed page; returns how many pages became free."""
        counts = Counter(pages)
        for p, c in counts.items():  # validate first so a double free changes nothing
            self._check_page(p, "decref")
            if self._refcount[p] < c:
                raise RuntimeError(f"KVPool.decref: double free of page {p} "
                                   f"(refcount {self._refcount[p]}, asked to drop {c})")
        freed = 0
        for p, c in counts.items():
            self._refcount[p] -= c
            if self._refcount[p] == 0:
                self._free.append(p)
                freed += 1
        return freed

    def refcount(self, page: int) -> int:
        if page == NULL_PAGE:
            return 0
        self._check_page(page, "refcount")
        return self._refcount[page]

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (cheap enough to call in tests)."""
        free_set = set(self._free)
        assert len(free_set) == len(self._free), "duplicate pages in the free list"
        assert NULL_PAGE not in free_set, "NULL page is in the free list"
        assert self._refcount[NULL_PAGE] == 0, "NULL page has references"
        live = 0
        for p in range(1, self.num_pages):
            rc = self._refcount[p]
            assert rc >= 0, f"page {p} has negative refcount {rc}"
            if p in free_set:
                assert rc == 0, f"free page {p} has refcount {rc}"
            else:
                assert rc > 0, f"page {p} is neither free nor referenced (leaked)"
                live += 1
        assert len(self._free) + live == self.num_usable_pages, "free + referenced != usable pages"

    # ----------------------------------------------------------------- data
    def copy_slots(self, src_page: int, dst_page: int, n_slots: int) -> None:
        """Copy the first `n_slots` token slots of K and V in every layer (copy-on-write prefix reuse)."""
        for p in (src_page, dst_page):
            self._check_page(p, "copy_slots")
            if self._refcount[p] == 0:
                raise RuntimeError(f"KVPool.copy_slots: page {p} is free (was it evicted before the copy?)")
        if not 0 <= n_slots <= self.page_size:
            raise ValueError(f"KVPool.copy_slots: n_slots must be in [0, {self.page_size}], got {n_slots}")
        if n_slots == 0 or src_page == dst_page:
            return
        for pool in (*self.k_pools, *self.v_pools):
            pool[dst_page, :n_slots] = pool[src_page, :n_slots]

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Scatter K/V rows into flat slots `page * page_size + offset`. slots [T]; k, v [T, Hkv, D].

        No refcount or range checks on `slots`: they may live on the GPU and checking would synchronise.
        """
        if slots.dim() != 1:
            raise ValueError(f"KVPool.write: slots must be 1-D, got shape {tuple(slots.shape)}")
        want = (slots.shape[0], self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"KVPool.write: k/v must have shape {want}, got {tuple(k.shape)} / {tuple(v.shape)}")
        flat = (self.num_pages * self.page_size, self.num_kv_heads, self.head_dim)
        self.k_pools[layer].view(flat)[slots] = k.to(self.dtype)
        self.v_pools[layer].view(flat)[slots] = v.to(self.dtype)
