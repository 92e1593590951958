"""Continuous batching over the paged pool: admit with prefix reuse, decode, evict, preempt."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_pool import KVPool
from .radix_cache import RadixCache, RadixNode, common_prefix_len
from .request import Request


@dataclass
class ScheduledBatch:
    """What the runner executes next. For extend: per request, tokens from `starts[i]` on are new."""

    mode: str  # "extend" | "decode"
    requests: list[Request]
    starts: list[int] = field(default_factory=list)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    """Prefill-first scheduling (new requests are admitted before the next decode step).

    Memory pressure is handled in the order: evict unlocked cache leaves, then preempt the
    most recently admitted running request, whose computed pages go into the prefix cache
    so that its recomputation is often a cache hit.
    """

    def __init__(self, pool: KVPool, cache: RadixCache, max_prefill_tokens: int = 8192, max_running: int = 256):
        self.pool, self.cache = pool, cache
        self.page_size = pool.page_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_running = max_running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- queue ---------------------------------------------------------------------------
    def check_fits(self, req: Request) -> None:
        need = _ceil_div(req.max_total_tokens(), self.page_size)
        if need > self.pool.num_usable_pages:
            raise ValueError(
                f"request needs {req.max_total_tokens()} tokens of KV ({need} pages) but the pool holds only "
                f"{self.pool.num_usable_pages} pages of {self.page_size} tokens; raise max_cache_tokens or shorten "
                f"the prompt / max_tokens"
            )

    def add(self, req: Request) -> None:
        self.check_fits(req)
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort_stalled(self) -> RuntimeError:
        """Nothing runs and nothing can be admitted: drop the waiting requests (they hold no pages)
        and describe why, instead of looping forever."""
        n = len(self.waiting)
        self.waiting.clear()
        stats = self.cache.stats()
        return RuntimeError(
            f"scheduler stalled: {n} waiting request(s) cannot get KV pages ({self.pool.num_free_pages} free of "
            f"{self.pool.num_usable_pages}, {stats['locked_pages']} locked by the prefix cache); they were dropped")

    # -- scheduling ----------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        batch = self._admit()
        if batch.requests:
            return batch
        if self.running:
            return self._prepare_decode()
        return None

    def _admit(self) -> ScheduledBatch:
        batch = ScheduledBatch("extend", [])
        budget = self.max_prefill_tokens
        deferred: list[Request] = []
        req: Request | None = None
        try:
            while self.waiting and len(self.running) + len(batch.requests) < self.max_running:
                req = self.waiting.popleft()
                if self._shares_uncached_prefix(req, batch):
                    deferred.append(req)  # compute the shared part once; it is a cache hit next step
                    req = None
                    continue
                start = self._try_allocate(req, budget if batch.requests else None)
                if start is None:
                    break
                batch.requests.append(req)
                batch.starts.append(start)
                req = None
                budget -= batch.requests[-1].seq_len - start
        finally:  # also on an exception: every request stays either waiting or running (abort_all finds it)
            if req is not None:
                self.waiting.appendleft(req)  # not admitted (no pages, or it raised: _try_allocate undid itself)
            self.waiting.extendleft(reversed(deferred))
            self.running.extend(batch.requests)
        return batch

    def _shares_uncached_prefix(self, req: Request, batch: ScheduledBatch) -> bool:
        """Should `req` wait one launch for KV that a request of this batch is about to compute?

        Yes when that saves at least a page, or when the other request is a scoring one (it finishes
        in this launch and publishes every token, its partly filled last page included) and the wait
        at least halves `req`'s work: the candidates of a prompt reuse all of it. The halving rule
        keeps requests that share a few tokens by chance from queueing behind each other.
        """
        if not self.cache.enabled:
            return False
        ids, limit = req.all_ids, self._match_limit(req)
        own_start: int | None = None  # what req can already reuse (looked up only when it matters)
        for other, start in zip(batch.requests, batch.starts):
            if other.namespace != req.namespace:
                continue
            shared = min(common_prefix_len(ids, other.all_ids), limit)
            if shared <= start:
                continue
            if own_start is None:
                match = self.cache.match_prefix(req.namespace, ids[:limit])
                own_start = match.num_tokens + match.partial_tokens
            reusable = shared - max(start, own_start)
            if reusable >= self.page_size or (other.is_scoring and reusable > 0
                                              and 2 * reusable >= req.seq_len - own_start):
                return True
        return False

    def _match_limit(self, req: Request) -> int:
        limit = req.seq_len - 1  # at least one token is computed to produce logits
        if req.is_scoring:
            limit = min(limit, req.score_from - 1)
        return max(limit, 0)

    def _try_allocate(self, req: Request, budget: int | None) -> int | None:
        """Match the cached prefix, take pages for the rest; returns the first uncached position."""
        ids = req.all_ids
        match = self.cache.match_prefix(req.namespace, ids[: self._match_limit(req)])
        need = _ceil_div(req.seq_len, self.page_size) - len(match.pages)
        # With the partially matched page: its node is locked until the copy is done. That node may be
        # big, and pinning it can starve the allocation; then try again without the partial match.
        locked: RadixNode | None = None
        fresh: list[int] | None = None
        shared = False
        try:  # all or nothing: an exception (OOM in the copy, an interrupt) leaves no lock or page behind
            for lock_node, partial in ((match.partial_node, match.partial_tokens), (match.node, 0)):
                if lock_node is None:
                    continue
                start = match.num_tokens + partial
                if budget is not None and req.seq_len - start > budget:
                    return None
                self.cache.lock(lock_node)
                locked = lock_node
                fresh = self._alloc(need)
                if fresh is not None:
                    break
                self.cache.unlock(lock_node)
                locked = None
            else:
                return None
            self.pool.incref(match.pages)
            shared = True
            if partial:
                self.pool.copy_slots(match.partial_page, fresh[0], partial)
        except BaseException:
            if shared:
                self.pool.decref(match.pages)
            if fresh:
                self.pool.decref(fresh)
            if locked is not None:
                self.cache.unlock(locked)
            raise
        req.pages = list(match.pages) + fresh
        req.lock_node = lock_node
        req.num_computed = start
        if not req.admitted_once:
            req.cached_tokens = start
            req.admitted_once = True
        return start

    def _alloc(self, n: int) -> list[int] | None:
        if n <= 0:
            return []
        if self.pool.num_free_pages < n:
            self.cache.evict(n - self.pool.num_free_pages)
        return self.pool.alloc(n)

    def _prepare_decode(self) -> ScheduledBatch:
        """Make sure every running request has a slot for its newest token, preempting if needed."""
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if len(req.pages) * self.page_size >= req.seq_len:
                i += 1
                continue
            page = self._alloc(1)
            if page is not None:
                req.pages.extend(page)
                i += 1
                continue
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                break
        return ScheduledBatch("decode", list(self.running), [r.seq_len - 1 for r in self.running])

    # -- cache bookkeeping ---------------------------------------------------------------
    def cache_computed(self, req: Request) -> None:
        """Publish the full pages computed so far, so later requests with this prefix reuse them."""
        full = req.num_computed // self.page_size
        if full == 0:
            return
        node = self.cache.insert_and_lock(req.namespace, req.all_ids[: full * self.page_size], req.pages[:full])
        if req.lock_node is not None:
            self.cache.unlock(req.lock_node)
        req.lock_node = node

    def release(self, req: Request, publish: bool = True) -> None:
        """Give back everything a request holds. With `publish`, what it computed stays cached, its
        partly filled last page included (as a tail leaf): a request continuing the same tokens
        copies those slots."""
        if publish and req.num_computed:
            used = _ceil_div(req.num_computed, self.page_size)
            self.cache.insert(req.namespace, req.all_ids[: req.num_computed], req.pages[:used])
        if req.lock_node is not None:
            self.cache.unlock(req.lock_node)
            req.lock_node = None
        self.pool.decref(req.pages)
        req.pages = []
        req.num_computed = 0

    def abort_all(self) -> int:
        """Drop every waiting and running request without publishing anything more to the cache
        (finish_reason "abort" where unset); returns how many. Pages and locks go back."""
        reqs = list(self.running) + list(self.waiting)
        self.running.clear()
        self.waiting.clear()
        for req in reqs:
            self.release(req, publish=False)  # a failed pass may have left its KV half-written
            if req.finish_reason is None:
                req.finish_reason = "abort"
        return len(reqs)

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.release(req)
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        self.release(req)
