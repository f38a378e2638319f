"""Automatic prefix caching: full KV pages found again by the tokens they and their prefix hold.

Every full page of a sequence gets a prefix id: the pair (id of the previous page's prefix, the
page's tokens) names it, so two sequences share an id exactly when their token prefixes up to that
page's end are identical (equal keys compare their tokens; there is no hash to collide). Ids are
never reused. The primary layer group (global layers) hands out the ids; every group maps ids to
its own page holding that prefix. A sliding-window group only needs the pages inside the window
of the first new query, so a prefix is reusable when the primary group holds all its pages and the
window groups hold the last few.
"""

from __future__ import annotations

import itertools
from typing import Sequence

ROOT = -1  # prefix id of the empty prefix


class PrefixCache:
    """Maps prefix ids to pages, per layer group; knows which pages are cached."""

    def __init__(self, groups: Sequence[str], *, page_size: int):
        self.groups = tuple(groups)
        self.primary = self.groups[0]
        self.page_size = page_size
        self._ids: dict[tuple[int, tuple[int, ...]], int] = {}
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._page: dict[str, dict[int, int]] = {g: {} for g in self.groups}      # id -> page
        self._id_of: dict[str, dict[int, int]] = {g: {} for g in self.groups}     # page -> id
        self._next_id = itertools.count()
        self.queries = 0  # prompt tokens looked up
        self.hits = 0     # prompt tokens found

    def is_cached(self, group: str, page: int) -> bool:
        return page in self._id_of[group]

    def page_of(self, group: str, prefix_id: int) -> int | None:
        return self._page[group].get(prefix_id)

    def chain(self, tokens: Sequence[int], max_pages: int, parent: int = ROOT) -> list[int]:
        """Prefix ids of the leading full pages of `tokens` that the primary group holds."""
        ids, ps = [], self.page_size
        for p in range(max_pages):
            prefix_id = self._ids.get((parent, tuple(tokens[p * ps:(p + 1) * ps])))
            if prefix_id is None or prefix_id not in self._page[self.primary]:
                break
            ids.append(prefix_id)
            parent = prefix_id
        return ids

    def register(self, parent: int, page_tokens: Sequence[int], pages: dict[str, int]) -> int:
        """Cache a newly filled page (one page id per group; NULL entries are skipped).

        Returns the prefix id. When the prefix is already cached (another sequence computed the
        same tokens), the existing pages stay the cached ones.
        """
        key = (parent, tuple(page_tokens))
        prefix_id = self._ids.get(key)
        if prefix_id is None:
            prefix_id = next(self._next_id)
            self._ids[key] = prefix_id
            self._key_of[prefix_id] = key
        for group, page in pages.items():
            if page and prefix_id not in self._page[group] and page not in self._id_of[group]:
                self._page[group][prefix_id] = page
                self._id_of[group][page] = prefix_id
        return prefix_id

    def evict(self, group: str, page: int) -> None:
        """Forget a cached page that its pool is about to reuse."""
        prefix_id = self._id_of[group].pop(page)
        del self._page[group][prefix_id]
        if group == self.primary:  # the prefix is no longer findable; a recompute gets a new id
            self._ids.pop(self._key_of.pop(prefix_id), None)
