"""The report of a scored corpus, per domain: row count, mean typicality, and the k most and least
typical rows. Fed part by part (in input order), so it holds only 2k rows per domain; both
``fastmft score --report`` (JSON) and ``fastmft typicality`` (printed) read it, and both show each
listed row's text through :func:`shorten`."""

from __future__ import annotations

import heapq
import textwrap
from typing import Any, Sequence

import numpy as np


def shorten(text: str, width: int = 80) -> str:
    """One line of at most ``width`` characters, cut at a word with an ellipsis when longer (as
    Table 5 of the MFT paper shows instances)."""
    return textwrap.shorten(text, width=width, placeholder=" …")


class DomainReport:
    """Ties in typicality go to the earlier row at both ends."""

    def __init__(self, num_domains: int, top_k: int):
        self.top_k = top_k
        self.totals = np.zeros((num_domains, 2))  # rows, sum of typicality (float64)
        self._top: list[list] = [[] for _ in range(num_domains)]  # min-heaps of (score, -row, item)
        self._bottom: list[list] = [[] for _ in range(num_domains)]  # min-heaps of (-score, -row, item)

    def add(self, scores: np.ndarray, domains: np.ndarray, rows: np.ndarray, items: Sequence[Any]) -> None:
        """Rows (global row numbers ``rows``, in increasing order) with their typicality, domain
        ids and an item each (what the report shows of the row)."""
        np.add.at(self.totals, (domains, 0), 1.0)
        np.add.at(self.totals, (domains, 1), scores.astype(np.float64))
        k = self.top_k
        if not k:
            return
        for i in range(len(scores)):
            d, s, row = int(domains[i]), float(scores[i]), int(rows[i])
            for heap, entry in ((self._top[d], (s, -row, items[i])), (self._bottom[d], (-s, -row, items[i]))):
                (heapq.heappush if len(heap) < k else heapq.heappushpop)(heap, entry)

    def rows(self, d: int) -> int:
        return int(self.totals[d, 0])

    def mean(self, d: int) -> float | None:
        return float(self.totals[d, 1] / self.totals[d, 0]) if self.totals[d, 0] else None

    def most_typical(self, d: int) -> list[tuple[float, Any]]:
        """(typicality, item), highest first."""
        return [(s, item) for s, _, item in sorted(self._top[d], key=lambda e: e[:2], reverse=True)]

    def least_typical(self, d: int) -> list[tuple[float, Any]]:
        """(typicality, item), lowest first."""
        return [(-s, item) for s, _, item in sorted(self._bottom[d], key=lambda e: e[:2], reverse=True)]
