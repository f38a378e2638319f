"""KV page allocator: per-layer-group page pools, block tables, reference counts.

Every layer group ("global", "local") has its own pool of fixed-size pages; all layers of a group
share the group's page ids. A sequence's block table lists its pages in logical order: logical
page i holds the keys/values of tokens i*page_size ... (i+1)*page_size-1. Global layers keep every
page. Sliding-window layers only ever look back W tokens, so once a page lies wholly before the
window of the next query it goes back to the pool and its table entry becomes the null page
(page 0, which no sequence owns and padding writes land in).
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from jaxpage.kv_cache import NULL_PAGE


class PagePool:
    """Free list and reference counts of one group's pages; page 0 is reserved as the null page."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.ref_counts = np.zeros(num_pages, np.int32)
        self._free: deque[int] = deque(range(1, num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        self.ref_counts[pages] = 1
        return pages

    def incref(self, page: int) -> None:
        assert page != NULL_PAGE and self.ref_counts[page] > 0
        self.ref_counts[page] += 1

    def decref(self, page: int) -> None:
        assert page != NULL_PAGE and self.ref_counts[page] > 0, f"page {page} is not in use"
        self.ref_counts[page] -= 1
        if self.ref_counts[page] == 0:
            self._free.append(page)


@dataclasses.dataclass
class GroupUsage:
    page_size: int
    pages_total: int  # usable pages (null page excluded)
    pages_used: int
    tokens_stored: int  # tokens whose KV lives in held pages

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


class KVCacheManager:
    """Block tables of every live sequence over one pool per layer group."""

    def __init__(self, *, page_size: int, num_pages: dict[str, int],
                 windows: dict[str, int | None], max_context: int):
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.page_size = page_size
        self.groups = tuple(num_pages)
        self.pools = {g: PagePool(n) for g, n in num_pages.items()}
        self.windows = {g: windows.get(g) for g in self.groups}
        self.max_pages_per_seq = -(-max_context // page_size)
        self._tables: dict[int, dict[str, list[int]]] = {}
        self._first_live: dict[int, dict[str, int]] = {}  # first table index not yet released
        self._tokens_stored: dict[tuple[int, str], int] = {}

    # -- queries -----------------------------------------------------------------------------
    def block_table(self, seq_id: int, group: str) -> list[int]:
        return self._tables[seq_id][group] if seq_id in self._tables else []

    def num_held_pages(self, seq_id: int, group: str) -> int:
        table = self.block_table(seq_id, group)
        return sum(1 for p in table if p != NULL_PAGE)

    def pages_for(self, num_tokens: int, group: str, chunk: int = 1) -> int:
        """Most pages of `group` one sequence of `num_tokens` tokens holds at once."""
        total = -(-num_tokens // self.page_size)
        window = self.windows[group]
        if window is None:
            return total
        return min(total, -(-(window - 1 + chunk) // self.page_size) + 1)

    def usage(self) -> dict[str, GroupUsage]:
        stored = {g: 0 for g in self.groups}
        for (_, g), n in self._tokens_stored.items():
            stored[g] += n
        return {g: GroupUsage(page_size=self.page_size, pages_total=p.num_pages - 1,
                              pages_used=p.num_used, tokens_stored=stored[g])
                for g, p in self.pools.items()}

    # -- changes -----------------------------------------------------------------------------
    def allocate(self, seq_id: int, num_computed: int, num_new: int) -> bool:
        """Make room for tokens num_computed ... num_computed+num_new-1 of a sequence.

        First returns sliding-window pages the new queries can no longer see; then allocates the
        missing pages of every group, all or nothing. False when some pool is short.
        """
        tables = self._tables.setdefault(seq_id, {g: [] for g in self.groups})
        first_live = self._first_live.setdefault(seq_id, {g: 0 for g in self.groups})
        for g in self.groups:
            self._release_outside_window(g, tables[g], first_live, num_computed)
        end = num_computed + num_new
        needed = {g: max(0, -(-end // self.page_size) - len(tables[g])) for g in self.groups}
        if any(needed[g] > self.pools[g].num_free for g in self.groups):
            return False
        for g in self.groups:
            tables[g].extend(self.pools[g].allocate(needed[g]))
        return True

    def commit(self, seq_id: int, num_computed: int) -> None:
        """Record that the first `num_computed` tokens of a sequence are now in its pages."""
        for g in self.groups:
            start = self._first_live[seq_id][g] * self.page_size
            self._tokens_stored[(seq_id, g)] = max(0, num_computed - start)

    def free(self, seq_id: int) -> None:
        """Give every page of a sequence back (its table disappears)."""
        tables = self._tables.pop(seq_id, None)
        self._first_live.pop(seq_id, None)
        if tables is None:
            return
        for g, table in tables.items():
            self._tokens_stored.pop((seq_id, g), None)
            for page in table:
                if page != NULL_PAGE:
                    self.pools[g].decref(page)

    def _release_outside_window(self, group: str, table: list[int], first_live: dict[str, int],
                                num_computed: int) -> None:
        window = self.windows[group]
        if window is None:
            return
        # The next query sits at position num_computed and sees keys > num_computed - window.
        first_needed = max(0, num_computed - window + 1) // self.page_size
        for i in range(first_live[group], min(first_needed, len(table))):
            if table[i] != NULL_PAGE:
                self.pools[group].decref(table[i])
                table[i] = NULL_PAGE
        first_live[group] = max(first_live[group], min(first_needed, len(table)))

