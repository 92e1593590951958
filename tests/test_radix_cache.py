"""RadixCache: unit tests for each behaviour, then a stateful property test against a naive model."""
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.kv_pool import KVPool
from engine.radix_cache import RadixCache, RadixNode


def make(page_size: int = 2, num_pages: int = 32, enabled: bool = True) -> tuple[KVPool, RadixCache]:
    pool = KVPool(1, num_pages, page_size, 1, 1, torch.float32, "cpu")
    return pool, RadixCache(pool, page_size, enabled=enabled)


def put(pool: KVPool, cache: RadixCache, ns, tokens: list[int]) -> list[int]:
    """Request-style insert with fresh pages; the caller's own refs are dropped afterwards."""
    pages = pool.alloc(len(tokens) // pool.page_size)
    cache.insert(ns, tokens, pages)
    pool.decref(pages)
    return pages


def check(pool: KVPool, cache: RadixCache) -> None:
    pool.check_invariants()
    cache.check_invariants()


def test_split_on_partial_match():
    pool, cache = make(page_size=2)
    a = put(pool, cache, "ns", [1, 2, 3, 4, 5, 6])
    b = pool.alloc(3)
    assert cache.insert("ns", [1, 2, 3, 4, 7, 8], b) == 4  # two pages already cached: left alone
    assert [pool.refcount(p) for p in b] == [1, 1, 2]  # only the new page gained the tree's ref
    pool.decref(b)
    assert cache.stats()["nodes"] == 3 and cache.num_cached_pages == 4
    m = cache.match_prefix("ns", [1, 2, 3, 4, 7, 8, 9])
    assert m.pages == [a[0], a[1], b[2]] and m.num_tokens == 6 and m.node.tokens == (7, 8)
    m = cache.match_prefix("ns", [1, 2, 3])  # ends inside node (1,2,3,4): split so lock covers 1 page
    assert m.pages == [a[0]] and m.node.tokens == (1, 2) and m.node.pages == [a[0]]
    assert (m.partial_page, m.partial_tokens) == (a[1], 1)
    assert cache.stats()["nodes"] == 4
    check(pool, cache)


def test_namespaces_isolated():
    pool, cache = make()
    a = put(pool, cache, "v1", [1, 2, 3, 4])
    for ns in ("v2", ("step", 1), None):
        m = cache.match_prefix(ns, [1, 2, 3, 4])
        assert m.pages == [] and m.partial_page is None
    assert "v2" not in cache.roots  # querying does not create namespaces
    b = put(pool, cache, ("step", 1), [1, 2, 3, 4])
    assert cache.match_prefix("v1", [1, 2, 3, 4]).pages == a
    assert cache.match_prefix(("step", 1), [1, 2, 3, 4]).pages == b and set(a).isdisjoint(b)
    assert cache.drop_namespace("v1") == 2 and cache.match_prefix("v1", [1, 2]).pages == []
    assert cache.match_prefix(("step", 1), [1, 2, 3, 4]).pages == b
    check(pool, cache)


def test_partial_page_match_longest():
    pool, cache = make(page_size=4)
    a = put(pool, cache, 0, [1, 2, 3, 4])
    b = put(pool, cache, 0, [1, 2, 9, 9, 5, 5, 5, 5])
    m = cache.match_prefix(0, [1, 2, 3, 7, 0])
    assert (m.pages, m.partial_page, m.partial_tokens, m.partial_node.pages) == ([], a[0], 3, a)
    m = cache.match_prefix(0, [1, 2, 9])  # query shorter than a page
    assert (m.partial_page, m.partial_tokens) == (b[0], 3)
    m = cache.match_prefix(0, [1, 2, 9, 9, 5, 6])
    assert (m.pages, m.partial_page, m.partial_tokens) == ([b[0]], b[1], 1)
    m = cache.match_prefix(0, [7, 7, 7, 7])
    assert (m.partial_page, m.partial_tokens, m.partial_node) == (None, 0, None)
    assert cache.match_prefix(0, [1, 2, 3, 4]).partial_page is None  # exact full match
    check(pool, cache)


def test_lock_prevents_eviction():
    pool, cache = make(page_size=1)
    a = put(pool, cache, "x", [1, 2, 3])
    put(pool, cache, "x", [1, 5, 6])
    m = cache.match_prefix("x", [1, 2, 3])
    cache.lock(m.node)
    assert cache.evictable_pages() == 2  # (5, 6); the locked path holds 3
    assert cache.evict(100) == 2
    assert cache.match_prefix("x", [1, 2, 3]).pages == a and cache.num_cached_pages == 3
    cache.unlock(m.node)
    with pytest.raises(RuntimeError, match="below 0"):
        cache.unlock(m.node)
    assert cache.evict(100) == 3 and cache.num_cached_pages == 0 and cache.roots == {}
    with pytest.raises(RuntimeError, match="evicted"):
        cache.lock(m.node)
    assert pool.num_free_pages == pool.num_usable_pages
    check(pool, cache)


def test_lock_survives_split():
    pool, cache = make(page_size=1)
    put(pool, cache, "x", [1, 2, 3, 4])
    node = cache.match_prefix("x", [1, 2, 3, 4]).node
    cache.lock(node)
    put(pool, cache, "x", [1, 2, 9])  # splits the locked node: the new head inherits its lock
    check(pool, cache)
    assert cache.evict(100) == 1  # only (9) was evictable
    cache.unlock(node)
    check(pool, cache)
    assert cache.evict(100) == 4


def test_lru_order_and_tail_trim():
    pool, cache = make(page_size=1)
    for t in ([1], [2], [3, 3, 3]):
        put(pool, cache, "x", t)
    cache.match_prefix("x", [1])  # touch: [2] is now least recently used
    assert cache.evict(1) == 1
    assert cache.match_prefix("x", [2]).pages == [] and cache.match_prefix("x", [1]).num_tokens == 1
    cache.match_prefix("x", [1])
    assert cache.evict(1) == 1  # LRU leaf is [3,3,3]: only its tail page goes
    assert cache.match_prefix("x", [3, 3, 3]).num_tokens == 2
    put(pool, cache, "x", [4, 4, 4, 4])
    cache.match_prefix("x", [1])  # LRU order now: [3, 3], [4, 4, 4, 4], [1]
    assert cache.evict(4) == 4  # [3, 3] goes whole, then two tail pages of [4, 4, 4, 4]
    assert [cache.match_prefix("x", t).num_tokens for t in ([3], [4] * 4, [1])] == [0, 2, 1]
    check(pool, cache)


def test_parent_becomes_leaf_and_shared_pages():
    pool, cache = make(page_size=1)
    put(pool, cache, "x", [1, 2, 3])
    put(pool, cache, "x", [1, 2, 4])
    held = cache.match_prefix("x", [1, 2, 4]).pages
    pool.incref(held)  # a request still reads these: evicting them frees nothing
    assert cache.evict(2) == 1  # (3) freed; then (4), (1, 2) dropped from the tree without freeing
    assert cache.num_cached_pages == 0 and cache.roots == {}
    assert pool.decref(held) == 3
    check(pool, cache)


def test_disabled_mode():
    pool, cache = make(enabled=False)
    pages = pool.alloc(2)
    assert cache.insert("x", [1, 2, 3, 4], pages) == 0 and [pool.refcount(p) for p in pages] == [1, 1]
    m = cache.match_prefix("x", [1, 2, 3, 4])
    assert (m.pages, m.num_tokens, m.partial_page, m.partial_tokens) == ([], 0, None, 0)
    cache.lock(m.node)
    cache.unlock(m.node)
    assert cache.evict(10) == 0 and cache.num_cached_pages == 0
    check(pool, cache)


def test_tail_leaf_serves_partial_matches():
    """A finished sequence's partly filled last page is kept as a tail leaf: a query that continues
    the same tokens copies them out of it; a tail already covered by a full page is not stored twice."""
    pool, cache = make(page_size=4)
    pages = pool.alloc(2)
    assert cache.insert("ns", [1, 2, 3, 4, 5, 6], pages) == 0
    pool.decref(pages)
    assert cache.num_cached_pages == 2 and cache.stats()["nodes"] == 2
    m = cache.match_prefix("ns", [1, 2, 3, 4, 5, 6, 7])
    assert m.pages == [pages[0]] and (m.partial_page, m.partial_tokens) == (pages[1], 2)
    assert m.partial_node.tokens == (5, 6) and not m.partial_node.children
    m = cache.match_prefix("ns", [1, 2, 3, 4, 5, 9])
    assert (m.partial_page, m.partial_tokens) == (pages[1], 1)
    # a full page that starts with the tail covers it; the reverse insert is a no-op
    full = pool.alloc(2)
    assert cache.insert("ns", [1, 2, 3, 4, 5, 6, 7, 8], full) == 4
    more = pool.alloc(2)
    assert cache.insert("ns", [1, 2, 3, 4, 5, 6, 7], more) == 7 and pool.refcount(more[1]) == 1
    pool.decref(full + more)
    check(pool, cache)
    # tail leaves are evicted like any leaf, and a locked one is not
    m = cache.match_prefix("ns", [1, 2, 3, 4, 5, 6])
    cache.lock(m.partial_node)
    assert cache.evict(10) == 1 and cache.num_cached_pages == 2  # only the full (5, 6, 7, 8) page went
    cache.unlock(m.partial_node)
    assert cache.evict(10) == 2 and cache.num_cached_pages == 0
    check(pool, cache)


def test_reset_and_errors():
    pool, cache = make()
    put(pool, cache, "a", [1, 2, 3, 4])
    put(pool, cache, "b", [1, 2])
    with pytest.raises(ValueError, match="full pages"):
        cache.insert("a", [1, 2, 3], pool.alloc(3))  # a 3rd page with no tokens
    with pytest.raises(RuntimeError):
        cache.insert("a", [5, 6], [pool.num_pages - 1])  # not a live page
    node = cache.match_prefix("a", [1, 2]).node
    cache.lock(node)
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    cache.unlock(node)
    cache.reset()
    assert cache.num_cached_pages == 0 and cache.roots == {} and pool.num_free_pages == pool.num_usable_pages - 3
    check(pool, cache)
    with pytest.raises(ValueError):
        RadixCache(pool, 4)


# ---------------------------------------------------------------------------------------------------
# Stateful property test. The naive model is, per namespace, a dict {page-aligned prefix: page that
# holds that prefix's last page}. Every page's K slots hold token + 1 and its V slots namespace + 1, so
# soundness is checked on the data itself, not only on the tree's own bookkeeping.
NAMESPACES = ["a", "b", ("step", 1)]
# Random lists rarely share long prefixes, so most draws cut a few fixed bases and add a random tail.
BASES = [(0, 1, 2, 3) * 3, (0, 1, 2, 3, 3, 3, 2, 2, 1, 1, 0, 0), (1,) * 12]
NS = st.sampled_from(["a", "a", "a", "b", ("step", 1)])  # skewed so one tree grows deep
SHARED = st.builds(lambda base, cut, tail: list(base[:cut]) + tail,
                   st.sampled_from(BASES), st.integers(2, 12), st.lists(st.integers(0, 3), max_size=3))
TOKENS = st.one_of(SHARED, SHARED, st.lists(st.integers(0, 3), max_size=12))


def _common(a: tuple, b: tuple) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tree_content(cache: RadixCache) -> dict:
    out: dict = {ns: {} for ns in NAMESPACES}
    ps = cache.page_size
    stack = [(child, ()) for ns, root in cache.roots.items() for child in root.children.values()]
    while stack:
        node, prefix = stack.pop()
        for j, page in enumerate(node.pages):
            out[node.namespace][prefix + node.tokens[:(j + 1) * ps]] = page
        stack.extend((c, prefix + node.tokens) for c in node.children.values())
    return out


def path_tokens(node: RadixNode) -> tuple:
    segs = []
    while node is not None:
        segs.append(node.tokens)
        node = node.parent
    return sum(reversed(segs), ())


class CacheMachine(RuleBasedStateMachine):
    @initialize(ps=st.sampled_from([1, 2, 4]), capacity=st.integers(16, 96))
    def setup(self, ps: int, capacity: int) -> None:
        """`capacity` is in tokens (1-8 sequences): eviction is frequent, yet trees can grow."""
        self.ps = ps
        self.pool = KVPool(1, 1 + capacity // ps, ps, 1, 1, torch.float32, "cpu")
        self.cache = RadixCache(self.pool, ps)
        self.model: dict = {ns: {} for ns in NAMESPACES}
        self.requests: list = []  # (ns, tokens, pages, locked node, locked path)
        self.locks: list = []     # (ns, node, locked path)

    # -- helpers ------------------------------------------------------------------------------------
    def write(self, ns, tokens: tuple, pages: list[int], start: int) -> None:
        if start >= len(tokens):
            return
        slots = torch.tensor([pages[i // self.ps] * self.ps + i % self.ps for i in range(start, len(tokens))])
        k = torch.tensor(tokens[start:], dtype=torch.float32).view(-1, 1, 1) + 1
        self.pool.write(0, slots, k, torch.full_like(k, NAMESPACES.index(ns) + 1))

    def assert_holds(self, ns, tokens: tuple, pages: list[int]) -> None:
        """Pages hold exactly `tokens` (KV computed under namespace `ns`)."""
        if not tokens:
            return
        slots = torch.tensor([pages[i // self.ps] * self.ps + i % self.ps for i in range(len(tokens))])
        k = self.pool.k_pools[0].view(-1)[slots]
        v = self.pool.v_pools[0].view(-1)[slots]
        assert k.tolist() == [t + 1 for t in tokens] and v.tolist() == [NAMESPACES.index(ns) + 1] * len(tokens)

    def longest(self, ns, tokens: tuple) -> int:
        n = 0
        while (n + 1) * self.ps <= len(tokens) and tokens[:(n + 1) * self.ps] in self.model[ns]:
            n += 1
        return n

    def match_checked(self, ns, tokens: tuple):
        m = self.cache.match_prefix(ns, tokens)
        n = self.longest(ns, tokens)
        assert m.pages == [self.model[ns][tokens[:(j + 1) * self.ps]] for j in range(n)]
        assert m.num_tokens == n * self.ps
        self.assert_holds(ns, tokens[:m.num_tokens], m.pages)
        base, nxt = tokens[:n * self.ps], tokens[n * self.ps:(n + 1) * self.ps]
        best = max((_common(prefix[len(base):], nxt) for prefix in self.next_pages(ns, base)), default=0)
        assert best < self.ps or not nxt
        assert m.partial_tokens == best and (m.partial_page is None) == (best == 0)
        if best:
            self.assert_holds(ns, nxt[:best], [m.partial_page])
        return m

    def next_pages(self, ns, base: tuple):
        """Model keys one page (full, or a tail leaf's partial one) below the page-aligned `base`."""
        return [p for p in self.model[ns] if len(base) < len(p) <= len(base) + self.ps and p[:len(base)] == base]

    def insert_checked(self, ns, tokens: tuple, pages: list[int]) -> None:
        """Insert `tokens` (the last of `pages` may be partly filled: a tail leaf)."""
        n = len(tokens) // self.ps
        known = self.longest(ns, tokens[:n * self.ps])
        base, tail = tokens[:n * self.ps], tokens[n * self.ps:]
        covered = bool(tail) and known == n and any(
            _common(p[len(base):], tail) == len(tail) for p in self.next_pages(ns, base))
        assert self.cache.insert(ns, tokens, pages) == known * self.ps + (len(tail) if covered else 0)
        for j in range(known, n):
            self.model[ns][tokens[:(j + 1) * self.ps]] = pages[j]
        if tail and not covered:
            self.model[ns][tokens] = pages[n]

    def evict_checked(self, n: int) -> None:
        free_before, evictable = self.pool.num_free_pages, self.cache.evictable_pages()
        freed = self.cache.evict(n)
        assert self.pool.num_free_pages == free_before + freed and freed <= evictable
        assert freed >= n or self.cache.evictable_pages() == 0
        tree = tree_content(self.cache)
        for ns in NAMESPACES:  # sound: only what the model had, at the same pages; locks survive
            assert tree[ns].items() <= self.model[ns].items()
        for ns, path in self.locked_paths():
            assert path in tree[ns] or not path
        self.model = tree

    def locked_paths(self):
        return [(ns, path) for ns, _, path in self.locks] + [(r[0], r[4]) for r in self.requests]

    def alloc(self, n: int) -> list[int] | None:
        pages = self.pool.alloc(n)
        if pages is None:
            self.evict_checked(n - self.pool.num_free_pages)
            pages = self.pool.alloc(n)
        return pages

    # -- rules --------------------------------------------------------------------------------------
    @rule(ns=NS, tokens=TOKENS)
    def match(self, ns, tokens):
        self.match_checked(ns, tuple(tokens))

    @rule(ns=NS, tokens=TOKENS, with_tail=st.booleans())
    def insert_fresh(self, ns, tokens, with_tail):
        tokens = tuple(tokens if with_tail else tokens[:len(tokens) // self.ps * self.ps])
        pages = self.alloc(-(-len(tokens) // self.ps))
        if pages is None:
            return
        self.write(ns, tokens, pages, 0)
        self.insert_checked(ns, tokens, pages)
        self.pool.decref(pages)

    @precondition(lambda self: len(self.requests) < 4)  # else held pages starve everything else
    @rule(ns=NS, tokens=TOKENS)
    def start_request(self, ns, tokens):
        """Admission: match, lock, reuse the prefix (+ copy-on-write partial page), alloc the rest."""
        tokens = tuple(tokens)
        m = self.match_checked(ns, tokens)
        target = m.partial_node or m.node
        self.cache.lock(target)
        self.pool.incref(m.pages)
        fresh = self.alloc(-(-len(tokens) // self.ps) - len(m.pages))
        if fresh is None:
            self.cache.unlock(target)
            self.pool.decref(m.pages)
            return
        done = m.num_tokens
        if fresh and m.partial_page is not None:
            self.pool.copy_slots(m.partial_page, fresh[0], m.partial_tokens)
            done += m.partial_tokens
        self.write(ns, tokens, m.pages + fresh, done)
        self.assert_holds(ns, tokens, m.pages + fresh)
        self.requests.append((ns, tokens, m.pages + fresh, target, path_tokens(target)))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish_request(self, data):
        ns, tokens, pages, node, _ = self.requests.pop(data.draw(st.integers(0, len(self.requests) - 1)))
        if data.draw(st.booleans()):  # publish the partly filled last page too, as the scheduler does
            self.insert_checked(ns, tokens, pages)
        else:
            self.insert_checked(ns, tokens[:len(tokens) // self.ps * self.ps], pages[:len(tokens) // self.ps])
        self.cache.unlock(node)
        self.pool.decref(pages)

    @rule(ns=NS, tokens=TOKENS)
    def lock(self, ns, tokens):
        m = self.match_checked(ns, tuple(tokens))
        self.cache.lock(m.node)
        self.locks.append((ns, m.node, tuple(tokens[:m.num_tokens])))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data):
        _, node, _ = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.cache.unlock(node)

    @rule(n=st.integers(0, 3), roll=st.integers(0, 3))
    def evict(self, n, roll):
        if roll == 2:  # explicit evictions are rarer than the ones allocation pressure triggers
            self.evict_checked(n)

    @rule(ns=NS, roll=st.integers(0, 19))
    def drop_namespace(self, ns, roll):
        if roll != 7:  # wiping a whole tree is drastic: keep it rare so the trees can grow
            return
        if any(p_ns == ns and path for p_ns, path in self.locked_paths()):
            with pytest.raises(RuntimeError):
                self.cache.drop_namespace(ns)
        else:
            self.cache.drop_namespace(ns)
            self.model[ns] = {}

    # -- invariants ---------------------------------------------------------------------------------
    @invariant()
    def consistent(self):
        if not hasattr(self, "cache"):
            return
        self.pool.check_invariants()
        self.cache.check_invariants()
        tree = tree_content(self.cache)
        assert tree == self.model
        expected = Counter(p for ns in tree for p in tree[ns].values())
        expected.update(p for r in self.requests for p in r[2])
        assert all(self.pool.refcount(p) == expected[p] for p in range(1, self.pool.num_pages))
        # a lock pins the node's page-aligned ancestors and itself (a tail leaf is nobody's ancestor)
        locked = {(ns, path[:i]) for ns, path in self.locked_paths() for i in range(self.ps, len(path) + 1, self.ps)}
        locked |= {(ns, path) for ns, path in self.locked_paths()}
        unlocked = sum((ns, prefix) not in locked for ns in tree for prefix in tree[ns])
        assert self.cache.evictable_pages() == unlocked
        assert self.cache.num_cached_pages == sum(len(t) for t in tree.values())


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
