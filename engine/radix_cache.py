"""Radix prefix cache over token ids at page granularity (DESIGN.md section 6).

Every key carries a namespace (adapter version at inference, (step, branch) during training) with one
tree per namespace, so KV computed under different weights is never shared. The tree owns one pool
reference per stored page; requests own their own references and lock the nodes they read from.

Besides runs of full pages the tree keeps *tail leaves*: the partially filled last page of a finished
sequence (one page, fewer than page_size tokens, never with children). A later query can copy the
matching slots out of it. This is what lets the candidates of a prompt reuse all of the prompt's KV,
not only its page-aligned part.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from engine.kv_pool import KVPool


@dataclass(eq=False)
class RadixNode:
    """A run of full pages (`tokens` has len(pages) * page_size ids), or a tail leaf: one page holding
    fewer than page_size tokens. The root has none."""
    tokens: tuple[int, ...]
    pages: list[int]
    parent: RadixNode | None = field(default=None, repr=False)
    namespace: Hashable = None
    # keyed by the child's first page of tokens (two children never share a first page); a tail leaf
    # is keyed by all its tokens, which are fewer, so the two kinds of keys never collide
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict, repr=False)
    lock_ref: int = 0
    last_access: int = 0
    evicted: bool = False       # set when removed from the tree, so stale handles are caught


@dataclass
class PrefixMatch:
    node: RadixNode             # deepest matched node (lock this while using the pages)
    pages: list[int]            # pages of the matched full-page prefix, in order
    num_tokens: int             # == len(pages) * page_size
    partial_page: int | None    # cached page whose first `partial_tokens` tokens equal the query's next ones
    partial_tokens: int         # 0 if none; the caller may copy those slots into a fresh page (copy-on-write)
    # Node holding partial_page. Lock it instead of `node` (it is a descendant, so this protects both)
    # if anything may evict before the copy is done.
    partial_node: RadixNode | None = None


class RadixCache:
    """Longest-prefix KV reuse with LRU eviction of unlocked leaves."""

    def __init__(self, pool: KVPool, page_size: int, enabled: bool = True) -> None:
        if page_size != pool.page_size:
            raise ValueError(f"RadixCache page_size {page_size} != pool page_size {pool.page_size}")
        self.pool = pool
        self.page_size = page_size
        self.enabled = enabled
        self.roots: dict[Hashable, RadixNode] = {}
        self._clock = 0                      # monotonic access counter for LRU
        self._num_cached = 0                 # pages held by the tree
        self._num_locked = 0                 # pages in nodes with lock_ref > 0
        self._num_nodes = 0                  # non-root nodes
        self._hits = self._queries = self._partial_hits = self._evicted = 0
        self._disabled_root = RadixNode((), [])

    # ------------------------------------------------------------------ queries
    def match_prefix(self, namespace: Hashable, tokens: Sequence[int]) -> PrefixMatch:
        """Longest cached page-aligned prefix of `tokens` (+ best partial next page). Refcounts untouched."""
        toks = tuple(tokens)
        self._queries += len(toks)
        root = self.roots.get(namespace) if self.enabled else self._disabled_root
        if root is None:  # unknown namespace: a detached root keeps lock/unlock valid without growing `roots`
            root = RadixNode((), [], namespace=namespace)
        node, pages = self._walk(root, toks, len(toks) // self.page_size)
        n = len(pages) * self.page_size
        rest = toks[n:n + self.page_size]
        best_k, best = 0, None
        for child in node.children.values():  # a full child's first page or a tail leaf (k < page_size)
            k = common_prefix_len(child.tokens, rest)
            if k > best_k:
                best_k, best = k, child
        if best is not None:
            best.last_access = self._clock
            self._partial_hits += best_k
        self._hits += n
        return PrefixMatch(node, pages, n, best.pages[0] if best else None, best_k, best)

    def insert(self, namespace: Hashable, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Store the missing suffix (one new ref per stored page). Returns tokens already cached.

        The last page may be partly filled (a finished sequence's tail): it becomes a tail leaf unless
        the tree already holds those tokens after the same prefix.
        """
        return self._insert(namespace, tokens, pages)[0]

    def insert_and_lock(self, namespace: Hashable, tokens: Sequence[int], pages: Sequence[int]) -> RadixNode:
        """Insert full pages and lock the node that ends at the last of them (a running request's
        prefix: protected, and its own pages stay usable by later requests). Returns the locked node."""
        if len(tokens) % self.page_size:
            raise ValueError("RadixCache.insert_and_lock: full pages only (a running request's tail still grows)")
        node = self._insert(namespace, tokens, pages)[1]
        self.lock(node)
        return node

    def _insert(self, namespace: Hashable, tokens: Sequence[int], pages: Sequence[int]) -> tuple[int, RadixNode]:
        """(tokens already cached, deepest node of the full pages)."""
        ps = self.page_size
        if not (len(pages) - 1) * ps < len(tokens) <= len(pages) * ps:
            raise ValueError(f"RadixCache.insert: {len(tokens)} tokens for {len(pages)} pages of {ps}; "
                             "insert full pages, the last one possibly partly filled")
        if not self.enabled:
            return 0, self._disabled_root
        if not pages:  # nothing to store: an existing root, or a detached one (no empty tree is kept)
            return 0, self.roots.get(namespace) or RadixNode((), [], namespace=namespace)
        toks, pages = tuple(tokens), list(pages)
        num_full = len(toks) // ps
        root = self._root(namespace)
        node, matched = self._walk(root, toks, num_full)
        p = len(matched)
        try:
            if p < num_full:
                node = self._add_child(node, toks[p * ps:num_full * ps], pages[p:num_full])
            tail = toks[num_full * ps:]
            cover = next((c for c in node.children.values() if common_prefix_len(c.tokens, tail) == len(tail)), None)
            if tail and cover is not None:
                cover.last_access = self._clock
                return p * ps + len(tail), node
            if tail:
                self._add_child(node, tail, pages[num_full:])
        except (RuntimeError, ValueError):
            self._maybe_prune_root(root)
            raise
        return p * ps, node

    def _root(self, namespace: Hashable) -> RadixNode:
        root = self.roots.get(namespace)
        if root is None:
            root = self.roots[namespace] = RadixNode((), [], namespace=namespace)
        return root

    def _add_child(self, parent: RadixNode, tokens: tuple[int, ...], pages: list[int]) -> RadixNode:
        self.pool.incref(pages)  # raises if a page is not live; the tree gains nothing
        child = RadixNode(tokens, pages, parent, parent.namespace, last_access=self._clock)
        parent.children[tokens[:self.page_size]] = child
        self._num_cached += len(pages)
        self._num_nodes += 1
        return child

    # ------------------------------------------------------------------ locking
    def lock(self, node: RadixNode) -> None:
        """Protect `node` and its ancestors from eviction."""
        if node.evicted:
            raise RuntimeError("RadixCache.lock: node was evicted (lock right after match_prefix)")
        n: RadixNode | None = node
        while n is not None:
            if n.lock_ref == 0:
                self._num_locked += len(n.pages)
            n.lock_ref += 1
            n = n.parent

    def unlock(self, node: RadixNode) -> None:
        path: list[RadixNode] = []
        n: RadixNode | None = node
        while n is not None:
            if n.lock_ref <= 0:
                raise RuntimeError("RadixCache.unlock: lock_ref would go below 0 (unlock without lock?)")
            path.append(n)
            n = n.parent
        for n in path:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._num_locked -= len(n.pages)
        self._maybe_prune_root(path[-1])

    # ----------------------------------------------------------------- eviction
    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` pool pages from LRU unlocked leaves; returns pages actually freed.

        A leaf bigger than needed loses only its tail pages: the prefix stays useful to later requests.
        """
        if not self.enabled or num_pages <= 0:
            return 0
        seq = itertools.count()
        heap = [(n.last_access, next(seq), n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            need = num_pages - freed
            if len(node.pages) > need:
                drop = node.pages[-need:]
                node.pages = node.pages[:-need]
                node.tokens = node.tokens[:len(node.pages) * self.page_size]
                heapq.heappush(heap, (node.last_access, next(seq), node))
            else:
                drop = node.pages
                parent = node.parent
                assert parent is not None
                del parent.children[node.tokens[:self.page_size]]
                node.parent, node.evicted = None, True
                self._num_nodes -= 1
                if parent.parent is None:
                    self._maybe_prune_root(parent)
                elif not parent.children and parent.lock_ref == 0:
                    heapq.heappush(heap, (parent.last_access, next(seq), parent))
            self._num_cached -= len(drop)
            n_freed = self.pool.decref(drop)
            freed += n_freed
            self._evicted += n_freed
        return freed

    @property
    def num_cached_pages(self) -> int:
        return self._num_cached

    def evictable_pages(self) -> int:
        """Pages in unlocked subtrees: an upper bound on what evict() can free (shared pages stay live)."""
        return self._num_cached - self._num_locked

    def drop_namespace(self, namespace: Hashable) -> int:
        """Drop one namespace's tree (e.g. weights moved on); returns pages freed. Raises if locked."""
        root = self.roots.get(namespace)
        if root is None:
            return 0
        if any(c.lock_ref for c in root.children.values()):  # a bare root lock (empty match) pins nothing
            raise RuntimeError(f"RadixCache.drop_namespace: namespace {namespace!r} has locked nodes")
        nodes = list(self._nodes([root]))
        pages = [p for n in nodes for p in n.pages]
        for n in nodes:
            n.evicted = True
        del self.roots[namespace]
        self._num_cached -= len(pages)
        self._num_nodes -= len(nodes)
        return self.pool.decref(pages)

    def reset(self) -> None:
        """Drop everything (decref all tree pages). Raises if any node is locked."""
        locked = [ns for ns, r in self.roots.items() if any(c.lock_ref for c in r.children.values())]
        if locked:
            raise RuntimeError(f"RadixCache.reset: namespaces {locked!r} still have locked nodes")
        for ns in list(self.roots):
            self.drop_namespace(ns)

    def stats(self) -> dict:
        return {"cached_pages": self._num_cached, "locked_pages": self._num_locked,
                "evictable_pages": self.evictable_pages(), "nodes": self._num_nodes,
                "namespaces": len(self.roots), "hits_tokens": self._hits, "queries_tokens": self._queries,
                "partial_hits_tokens": self._partial_hits, "evicted_pages": self._evicted}

    def check_invariants(self) -> None:
        """AssertionError if the tree structure or its counters are inconsistent (for tests)."""
        ps, cached, locked, count = self.page_size, 0, 0, 0
        for ns, root in self.roots.items():
            assert root.parent is None and not root.tokens and not root.pages and root.namespace == ns
            for node in self._nodes([root]):
                count += 1
                cached += len(node.pages)
                locked += len(node.pages) if node.lock_ref else 0
                parent = node.parent
                assert parent is not None and parent.children.get(node.tokens[:ps]) is node, "broken link"
                tail_leaf = len(node.pages) == 1 and 0 < len(node.tokens) < ps and not node.children
                assert node.pages and (len(node.tokens) == len(node.pages) * ps or tail_leaf), "segment/pages mismatch"
                assert 0 <= node.lock_ref <= parent.lock_ref, "lock_ref not propagated to ancestors"
                assert node.namespace == ns, "node in the wrong namespace"
                assert all(self.pool.refcount(p) >= 1 for p in node.pages), "tree holds a free page"
        assert (cached, locked, count) == (self._num_cached, self._num_locked, self._num_nodes), "bad counters"

    # ----------------------------------------------------------------- internals
    def _nodes(self, roots: list[RadixNode] | None = None):
        """All non-root nodes below `roots` (default: every namespace)."""
        stack = [c for r in (self.roots.values() if roots is None else roots) for c in r.children.values()]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _walk(self, root: RadixNode, toks: tuple[int, ...], n_pages: int) -> tuple[RadixNode, list[int]]:
        """Descend along the first `n_pages` full pages; split a node where the match ends inside it,
        so the returned node covers exactly the matched pages (locking it then protects all of them)."""
        ps = self.page_size
        self._clock += 1
        node, pages = root, []
        root.last_access = self._clock
        while len(pages) < n_pages:
            start = len(pages) * ps
            child = node.children.get(toks[start:start + ps])
            if child is None:
                break
            m = 1
            limit = min(len(child.pages), n_pages - len(pages))
            while m < limit and child.tokens[m * ps:(m + 1) * ps] == toks[start + m * ps:start + (m + 1) * ps]:
                m += 1
            if m < len(child.pages):
                child = self._split(child, m)
            child.last_access = self._clock
            pages.extend(child.pages)
            node = child
        return node, pages

    def _split(self, node: RadixNode, m: int) -> RadixNode:
        """Cut `node` after `m` pages; the new node is the PREFIX, so existing handles to `node` stay
        the deepest node of their path and their locks remain balanced."""
        ps, parent = self.page_size, node.parent
        assert parent is not None
        head = RadixNode(node.tokens[:m * ps], node.pages[:m], parent, node.namespace,
                         lock_ref=node.lock_ref, last_access=node.last_access)
        parent.children[head.tokens[:ps]] = head
        node.tokens, node.pages, node.parent = node.tokens[m * ps:], node.pages[m:], head
        head.children[node.tokens[:ps]] = node
        self._num_nodes += 1
        return head

    def _maybe_prune_root(self, root: RadixNode) -> None:
        """Forget empty, unlocked namespaces so per-step training namespaces do not accumulate."""
        if root.lock_ref == 0 and not root.children and self.roots.get(root.namespace) is root:
            del self.roots[root.namespace]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
