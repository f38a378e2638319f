"""KV page allocator: per-layer-group page pools, block tables, reference counts, sharing.

Every layer group ("global", "local") has its own pool of fixed-size pages; all layers of a group
share the group's page ids. A sequence's block table lists its pages in logical order: logical
page i holds tokens i*page_size ... (i+1)*page_size-1. Global layers keep every page. Sliding-window
layers only look back W tokens, so a page lying wholly before the window of the next query goes
back to the pool and its table entry becomes the null page (page 0: no sequence owns it, padding
writes land there).

Pages are shared by reference count: forked sequences (parallel samples, beams) share their
parent's pages, and with prefix caching new sequences reuse full pages whose token prefix matches.
A write into a shared page first copies it (copy-on-write); the copies are handed to the runner.
Freed pages that hold a cached prefix stay findable until the pool needs them (LRU eviction).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, deque
from typing import Callable, Sequence

import numpy as np

from jaxpage.kv_cache import NULL_PAGE
from jaxpage.prefix_cache import ROOT, PrefixCache


class PagePool:
    """Free list, reference counts and evictable cached pages of one group; page 0 is reserved."""

    def __init__(self, num_pages: int, *, is_cached: Callable[[int], bool] = lambda p: False,
                 on_evict: Callable[[int], None] = lambda p: None):
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.ref_counts = np.zeros(num_pages, np.int32)
        self._free: deque[int] = deque(range(1, num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self._is_cached, self._on_evict = is_cached, on_evict

    @property
    def num_free(self) -> int:
        """Pages an allocation can get: never used, or cached but unreferenced."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - self.num_free

    @property
    def num_cached_idle(self) -> int:
        return len(self._evictable)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} pages, {self.num_free} free")
        pages = []
        for _ in range(n):
            if self._free:
                pages.append(self._free.popleft())
            else:
                page, _ = self._evictable.popitem(last=False)
                self._on_evict(page)
                pages.append(page)
        self.ref_counts[pages] = 1
        return pages

    def incref(self, page: int) -> None:
        assert page != NULL_PAGE
        if self.ref_counts[page] == 0:
            del self._evictable[page]  # only cached pages are referenced again from zero
        self.ref_counts[page] += 1

    def decref(self, page: int) -> None:
        assert page != NULL_PAGE and self.ref_counts[page] > 0, f"page {page} is not in use"
        self.ref_counts[page] -= 1
        if self.ref_counts[page] == 0:
            if self._is_cached(page):
                self._evictable[page] = None
            else:
                self._free.append(page)


@dataclasses.dataclass
class GroupUsage:
    page_size: int
    pages_total: int   # usable pages (null page excluded)
    pages_used: int    # referenced by some sequence
    tokens_stored: int  # tokens whose KV lives in referenced pages (each page counted once)

    @property
    def pages_free(self) -> int:
        return self.pages_total - self.pages_used

    @property
    def usage(self) -> float:
        return self.pages_used / max(self.pages_total, 1)

    @property
    def slot_utilization(self) -> float:
        """Tokens stored / page slots held (1.0 = no KV waste)."""
        return self.tokens_stored / max(self.pages_used * self.page_size, 1)


@dataclasses.dataclass
class _SeqPages:
    tables: dict[str, list[int]]
    first_live: dict[str, int]         # first table index not yet released (window groups)
    prefix_ids: list[int]              # prefix ids of the sequence's full, registered pages
    num_computed: int = 0
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # int32 copies

    def changed(self, group: str) -> None:
        self.arrays.pop(group, None)


class KVCacheManager:
    """Block tables of every live sequence over one pool per layer group."""

    def __init__(self, *, page_size: int, num_pages: dict[str, int],
                 windows: dict[str, int | None], max_context: int,
                 enable_prefix_caching: bool = False, max_copies_per_step: int = 16):
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.page_size = page_size
        self.groups = tuple(num_pages)
        self.windows = {g: windows.get(g) for g in self.groups}
        self.max_pages_per_seq = -(-max_context // page_size)
        self.prefix_cache = PrefixCache(self.groups, page_size=page_size) if enable_prefix_caching else None
        self.pools = {g: self._make_pool(g, n) for g, n in num_pages.items()}
        self.max_copies_per_step = max_copies_per_step
        self.pending_copies: dict[str, list[tuple[int, int]]] = {g: [] for g in self.groups}
        self._seqs: dict[int, _SeqPages] = {}

    def _make_pool(self, group: str, num_pages: int) -> PagePool:
        cache = self.prefix_cache
        if cache is None:
            return PagePool(num_pages)
        return PagePool(num_pages, is_cached=lambda p: cache.is_cached(group, p),
                        on_evict=lambda p: cache.evict(group, p))

    # -- queries -----------------------------------------------------------------------------
    def has(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: int, group: str) -> list[int]:
        s = self._seqs.get(seq_id)
        return s.tables[group] if s is not None else []

    def block_table_array(self, seq_id: int, group: str) -> np.ndarray:
        """The block table as int32 (kept between calls until the table changes)."""
        s = self._seqs[seq_id]
        if group not in s.arrays:
            s.arrays[group] = np.asarray(s.tables[group], np.int32)
        return s.arrays[group]

    def num_held_pages(self, seq_id: int, group: str) -> int:
        return sum(1 for p in self.block_table(seq_id, group) if p != NULL_PAGE)

    def pages_for(self, num_tokens: int, group: str, chunk: int = 1) -> int:
        """Most pages of `group` one sequence of `num_tokens` tokens holds at once."""
        total = -(-num_tokens // self.page_size)
        window = self.windows[group]
        if window is None:
            return total
        return min(total, -(-(window - 1 + chunk) // self.page_size) + 1)

    def usage(self) -> dict[str, GroupUsage]:
        stored = {g: {} for g in self.groups}  # page -> tokens it stores
        for s in self._seqs.values():
            for g, table in s.tables.items():
                for i in range(s.first_live[g], len(table)):
                    n = min(self.page_size, s.num_computed - i * self.page_size)
                    if table[i] != NULL_PAGE and n > 0:
                        stored[g][table[i]] = max(stored[g].get(table[i], 0), n)
        return {g: GroupUsage(page_size=self.page_size, pages_total=p.num_pages - 1,
                              pages_used=p.num_used, tokens_stored=sum(stored[g].values()))
                for g, p in self.pools.items()}

    # -- prefix reuse --------------------------------------------------------------------------
    def reuse_prefix(self, seq_id: int, tokens: Sequence[int]) -> int:
        """Give a new sequence the cached pages of its longest reusable prompt prefix.

        At least the last prompt token is always left to compute (its logits are needed).
        Returns the number of tokens whose KV is now in place.
        """
        cache = self.prefix_cache
        s = self._new_seq(seq_id)
        if cache is None:
            return 0
        ids = cache.chain(tokens, (len(tokens) - 1) // self.page_size)
        k = len(ids)
        while k and not all(cache.page_of(g, ids[j]) is not None
                            for g in self.groups for j in range(self._first_needed(g, k), k)):
            k -= 1  # a window group lacks a page it would still need: try a shorter prefix
        for g in self.groups:
            start = self._first_needed(g, k)
            s.tables[g] = [NULL_PAGE] * start
            for j in range(start, k):
                page = cache.page_of(g, ids[j])
                self.pools[g].incref(page)
                s.tables[g].append(page)
            s.first_live[g] = start
        s.prefix_ids = ids[:k]
        s.num_computed = k * self.page_size
        return s.num_computed

    def _first_needed(self, group: str, num_pages: int) -> int:
        """First page a query right after `num_pages` full pages can see in this group."""
        window = self.windows[group]
        if window is None:
            return 0
        return max(0, num_pages * self.page_size - window + 1) // self.page_size

    # -- changes -----------------------------------------------------------------------------
    def _new_seq(self, seq_id: int) -> _SeqPages:
        assert seq_id not in self._seqs, f"sequence {seq_id} already has pages"
        s = _SeqPages({g: [] for g in self.groups}, {g: 0 for g in self.groups}, [])
        self._seqs[seq_id] = s
        return s

    def copies_needed(self, seq_id: int, num_computed: int) -> int:
        """Shared pages a write at `num_computed` must copy first (summed over groups)."""
        s = self._seqs.get(seq_id)
        if s is None:
            return 0
        idx = num_computed // self.page_size
        return sum(1 for g, t in s.tables.items()
                   if idx < len(t) and t[idx] != NULL_PAGE and self.pools[g].ref_counts[t[idx]] > 1)

    def copy_slots_left(self) -> int:
        return self.max_copies_per_step - max(len(c) for c in self.pending_copies.values())

    def allocate(self, seq_id: int, num_computed: int, num_new: int) -> bool:
        """Make room for tokens num_computed ... num_computed+num_new-1 of a sequence.

        Returns window pages the new queries no longer see, copies a shared page about to be
        written (copy-on-write), and allocates missing pages -- all or nothing per group set.
        False when some pool is short.
        """
        s = self._seqs.get(seq_id) or self._new_seq(seq_id)
        for g in self.groups:
            self._release_outside_window(g, s, num_computed)
        end, idx = num_computed + num_new, num_computed // self.page_size
        cow = {g: idx < len(t) and t[idx] != NULL_PAGE and self.pools[g].ref_counts[t[idx]] > 1
               for g, t in s.tables.items()}
        needed = {g: max(0, -(-end // self.page_size) - len(s.tables[g])) + cow[g]
                  for g in self.groups}
        if any(needed[g] > self.pools[g].num_free for g in self.groups):
            return False
        for g in self.groups:
            table, pool = s.tables[g], self.pools[g]
            if cow[g]:
                (copy,) = pool.allocate(1)
                self.pending_copies[g].append((table[idx], copy))
                pool.decref(table[idx])
                table[idx] = copy
            if needed[g]:
                table.extend(pool.allocate(needed[g] - cow[g]))
                s.changed(g)
        return True

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Record that the first `num_computed` tokens are (or, once the launched step runs, will
        be) in the pages, and cache the newly full pages whose tokens are all known (negative ids
        are tokens still on the device). Registering at launch is safe: any reuse runs later."""
        s = self._seqs[seq_id]
        s.num_computed = max(s.num_computed, num_computed)  # an older step may report late
        cache = self.prefix_cache
        if cache is None:
            return
        ps = self.page_size
        for p in range(len(s.prefix_ids), num_computed // ps):
            page_tokens = token_ids[p * ps:(p + 1) * ps]
            if min(page_tokens) < 0:
                break
            parent = s.prefix_ids[-1] if s.prefix_ids else ROOT
            pages = {g: s.tables[g][p] for g in self.groups}
            s.prefix_ids.append(cache.register(parent, page_tokens, pages))

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every page of the parent (reference counts go up)."""
        parent = self._seqs[parent_id]
        child = self._new_seq(child_id)
        for g, table in parent.tables.items():
            child.tables[g] = list(table)
            for page in table:
                if page != NULL_PAGE:
                    self.pools[g].incref(page)
        child.first_live = dict(parent.first_live)
        child.prefix_ids = list(parent.prefix_ids)
        child.num_computed = parent.num_computed

    def free(self, seq_id: int) -> None:
        """Drop a sequence's references to its pages (cached ones stay findable)."""
        s = self._seqs.pop(seq_id, None)
        if s is None:
            return
        for g, table in s.tables.items():
            for page in table:
                if page != NULL_PAGE:
                    self.pools[g].decref(page)

    def take_copies(self) -> dict[str, list[tuple[int, int]]]:
        """Page copies (src, dst) to run before this step's writes; dropped ones already freed."""
        copies = {g: [(src, dst) for src, dst in c if self.pools[g].ref_counts[dst] > 0]
                  for g, c in self.pending_copies.items()}
        self.pending_copies = {g: [] for g in self.groups}
        return copies

    def _release_outside_window(self, group: str, s: _SeqPages, num_computed: int) -> None:
        window = self.windows[group]
        if window is None:
            return
        table = s.tables[group]
        # The next query sits at position num_computed and sees keys > num_computed - window.
        first_needed = min(max(0, num_computed - window + 1) // self.page_size, len(table))
        for i in range(s.first_live[group], first_needed):
            if table[i] != NULL_PAGE:
                self.pools[group].decref(table[i])
                table[i] = NULL_PAGE
                s.changed(group)
        s.first_live[group] = max(s.first_live[group], first_needed)
