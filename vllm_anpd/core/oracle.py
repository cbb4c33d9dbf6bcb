"""Brute-force reference of ANPD's semantics, in plain Python (lists and dicts), for the tests.

It recounts everything from the full context at every call, so it shares no state or trick with the
kernels: the tests check that the kernels' incremental tables draft exactly what this recount drafts.
"""

from __future__ import annotations

from collections import defaultdict

from .config import AnpdParams


def ngram_counts(context: list[int], n_min: int, n_max: int):
    """``{key tuple: {successor: (count, last position)}}`` over every n-gram of ``context`` once."""
    table: dict[tuple, dict[int, list[int]]] = defaultdict(dict)
    for pos in range(len(context)):
        for n in range(n_min, n_max + 1):
            m = n - 1
            if pos - m < 0:
                break
            key = tuple(context[pos - m:pos])
            entry = table[key].setdefault(context[pos], [0, -1])
            entry[0] += 1
            entry[1] = pos
    return table


def top_successor(successors: dict[int, list[int]]):
    """(token, count, total): highest count, ties to the most recently seen successor."""
    token, (count, _) = max(successors.items(), key=lambda kv: (kv[1][0], kv[1][1]))
    return token, count, sum(c for c, _ in successors.values())


def draft(context: list[int], params: AnpdParams, k: int) -> list[int]:
    """The draft ANPD proposes after ``context`` (no adaptive stop probability)."""
    return [token for token, _ in draft_with_levels(context, params, k)]


def draft_with_levels(context: list[int], params: AnpdParams, k: int) -> list[tuple[int, int]]:
    """``draft``'s tokens, each with the level (index from ``n_min``) it was drafted from."""
    table = ngram_counts(context, params.n_min, params.n_max)
    chain = list(context)
    out: list[tuple[int, int]] = []
    for _ in range(min(k, params.num_speculative_tokens)):
        chosen = None
        for level in range(params.num_levels - 1, -1, -1):
            m = params.n_min + level - 1
            if m > len(chain):
                continue
            key = tuple(chain[len(chain) - m:]) if m else ()
            if key not in table:
                continue
            token, count, total = top_successor(table[key])
            if count < params.min_count[level] or count < params.min_share[level] * total:
                continue
            chosen = (token, level)
            break
        if chosen is None:
            break
        out.append(chosen)
        chain.append(chosen[0])
    return out
