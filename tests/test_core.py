"""The drafting core against a brute-force oracle, plus golden cases, metamorphic and lifecycle checks.

Runs in seconds, without vLLM.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit

from vllm_anpd.core import NgramTables
from vllm_anpd.core import kernels, oracle
from vllm_anpd.core.tables import _allocation_of, _no_spare_half_pages
from vllm_anpd.core.config import PAPER
from vllm_anpd.core.config import AnpdParams as _AnpdParams


def AnpdParams(**kw):
    """The oracle models the paper's semantics plus the gate: adaptive stop and shared table off unless asked."""
    return _AnpdParams(**{**PAPER, **kw})

K = 6


def make_tables(params=None, slots=4, batch=8):
    return NgramTables(params or AnpdParams(num_speculative_tokens=K), num_slots=slots, max_batch=batch)


def run_single(tables, slot, context, k):
    row = np.zeros((1, max(len(context), 1)), np.int32)
    row[0, :len(context)] = context
    drafts, lens = tables.step(row, np.array([len(context)]), np.array([slot], np.int32),
                               np.array([k], np.int32))
    return drafts[0, :lens[0]].tolist()


# --- golden cases, worked by hand ------------------------------------------------------------------

def test_golden_highest_level_wins_and_chains():
    # n=5 key (1,2,3,?) is ambiguous; the context ends in "1 2 3": level n=4 key (1,2,3) was followed by
    # 4 once and 5 once, the tie goes to the most recent (5). Then the chain "2 3 5" -> "1" (n=4),
    # "3 5 1" -> "2", "5 1 2" -> "3", "1 2 3" -> "5".
    t = make_tables()
    assert run_single(t, t.acquire(), [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3], 5) == [5, 1, 2, 3, 5]


def test_golden_counts_beat_recency():
    # After 7: 8 twice, then 9 once (most recent). Count wins: 8.
    t = make_tables(AnpdParams(num_speculative_tokens=K, n_min=2, n_max=2))
    assert run_single(t, t.acquire(), [7, 8, 7, 8, 7, 9, 7], 1) == [8]


def test_golden_backoff_to_lower_level():
    # (5, 6) never seen, but 6 alone was followed by 1.
    t = make_tables(AnpdParams(num_speculative_tokens=K, n_min=2, n_max=3))
    assert run_single(t, t.acquire(), [6, 1, 0, 5, 6], 1) == [1]


def test_golden_no_match_no_draft():
    t = make_tables()
    assert run_single(t, t.acquire(), [1, 2, 3, 4], 4) == []


def test_prompt_is_counted_once_without_wraparound():
    # The published reference code feeds the prompt twice: counts double and the prompt's end is joined
    # to its start, so after [1 2 3] the false bigram (3 -> 1) would draft 1. Ours must not.
    t = make_tables(AnpdParams(num_speculative_tokens=K, n_min=2, n_max=2))
    assert run_single(t, t.acquire(), [1, 2, 3], 3) == []
    t2 = make_tables(AnpdParams(num_speculative_tokens=K, n_min=2, n_max=2, min_count=2))
    assert run_single(t2, t2.acquire(), [4, 5, 4], 1) == []  # (4 -> 5) seen once, not twice


def test_gate_min_count_and_share():
    ctx = [1, 2, 1, 3, 1, 2, 1]  # after 1: 2 twice, 3 once: share 2/3

    def gated(**gate):
        t = make_tables(AnpdParams(num_speculative_tokens=K, n_min=2, n_max=2, **gate))
        return run_single(t, t.acquire(), ctx, 1), t.stats()["gate_stops"]

    assert gated(min_count=2) == ([2], 0)
    assert gated(min_count=3) == ([], 1)
    assert gated(min_share=0.6) == ([2], 0)
    assert gated(min_share=0.7) == ([], 1)


def test_golden_top_successor_changes_keep_every_count():
    # Only the top successor's count lives in the key record; a dethroned top's count moves to the pair
    # table and must come back intact when it retakes the top. After 9: 1, 2, 2, 1, 1, 1 (top 1 with 4 of
    # 6), then 2, 2 (2 retakes the top at 4 of 8, ties to the most recent), then 1 (5 of 9: top again).
    def draft(ctx, **gate):
        t = make_tables(AnpdParams(num_speculative_tokens=K, n_min=2, n_max=2, **gate))
        return run_single(t, t.acquire(), ctx, 1)

    ctx = [9, 1, 9, 2, 9, 2, 9, 1, 9, 1, 9, 1, 9]
    assert draft(ctx, min_count=4) == [1] and draft(ctx, min_count=5) == []
    assert draft(ctx, min_share=0.66) == [1] and draft(ctx, min_share=0.67) == []
    ctx += [2, 9, 2, 9]
    assert draft(ctx, min_count=4) == [2] and draft(ctx, min_count=5) == []
    ctx += [1, 9]
    assert draft(ctx, min_count=5) == [1] and draft(ctx, min_share=5 / 9) == [1]
    assert draft(ctx, min_count=6) == [] and draft(ctx, min_share=0.56) == []


# --- oracle equality (property tests) --------------------------------------------------------------

params_strategy = st.builds(
    lambda n_min, span, k, mc, ms: AnpdParams(num_speculative_tokens=k, n_min=n_min, n_max=n_min + span,
                                               min_count=mc, min_share=ms),
    st.integers(1, 3), st.integers(0, 3), st.integers(1, 8), st.integers(1, 3),
    st.sampled_from([0.0, 0.3, 0.5, 0.9]))

small_tokens = st.lists(st.integers(0, 3), max_size=60)
huge_tokens = st.lists(st.sampled_from([0, 1, 2**31 - 1, -2**31, 262143, 151_000]), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=params_strategy, context=st.one_of(small_tokens, huge_tokens),
       cuts=st.lists(st.integers(0, 60), max_size=5), k=st.integers(0, 8))
def test_kernel_equals_oracle_at_every_step(params, context, cuts, k):
    """Feed the context in arbitrary increments (like engine steps); every draft equals the oracle's."""
    t = NgramTables(params, num_slots=2, max_batch=2)
    slot = t.acquire()
    row = np.zeros((1, max(len(context), 1)), np.int32)
    row[0, :len(context)] = context
    for n in sorted({min(c, len(context)) for c in cuts} | {len(context)}):
        drafts, lens = t.step(row, np.array([n]), np.array([slot], np.int32), np.array([k], np.int32))
        got = drafts[0, :lens[0]].tolist()
        assert got == oracle.draft(context[:n], params, k)
        assert len(got) <= min(k, params.num_speculative_tokens)


per_level_params = st.integers(1, 3).flatmap(lambda n_min: st.integers(0, 4).flatmap(lambda span: st.builds(
    lambda k, mc, ms: AnpdParams(num_speculative_tokens=k, n_min=n_min, n_max=n_min + span, min_count=mc,
                                 min_share=ms),
    st.integers(1, 8), st.lists(st.integers(1, 3), min_size=span + 1, max_size=span + 1),
    st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=span + 1, max_size=span + 1))))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=per_level_params, context=st.lists(st.integers(0, 2), max_size=90),
       cuts=st.lists(st.integers(0, 90), max_size=6), k=st.integers(1, 8))
def test_kernel_drafts_each_token_from_the_oracles_level(params, context, cuts, k):
    """Per-level gates, and the level of every drafted token (the per-level statistics) equal the oracle's:
    a key the kernel stores only implicitly must still be found at its own level."""
    t = NgramTables(params, num_slots=1, max_batch=1)
    slot = t.acquire()
    row = np.zeros((1, max(len(context), 1)), np.int32)
    row[0, :len(context)] = context
    for n in sorted({min(c, len(context)) for c in cuts} | {len(context)}):
        before = t.level_stats[slot, :, 0].copy()
        drafts, lens = t.step(row, np.array([n]), np.array([slot], np.int32), np.array([k], np.int32))
        expected = oracle.draft_with_levels(context[:n], params, k)
        assert drafts[0, :lens[0]].tolist() == [token for token, _ in expected]
        levels = np.bincount([level for _, level in expected], minlength=before.size)
        np.testing.assert_array_equal(t.level_stats[slot, :, 0] - before, levels)


@pytest.mark.parametrize("vocab", [2, 3, 5])
def test_deep_levels_equal_oracle_while_chaining(vocab):
    """Levels up to n = 9 on long low-entropy streams: drafts chain through many levels, so a level the kernel
    skips as unreachable (a chained key is at most one longer than the previous match) would show here."""
    rng = np.random.default_rng(vocab)
    params = AnpdParams(num_speculative_tokens=8, n_min=2, n_max=9)
    t = make_tables(params, slots=1, batch=1)
    slot = t.acquire()
    # Runs of a repeated motif with random noise in between: long matches that break and resume.
    motif = rng.integers(0, vocab, 12).tolist()
    context = []
    while len(context) < 400:
        context += motif[: rng.integers(3, 12)] + rng.integers(0, vocab, rng.integers(0, 4)).tolist()
    row = np.array([context], np.int32)
    for n in range(10, len(context), 7):
        drafts, lens = t.step(row, np.array([n]), np.array([slot], np.int32), np.array([8], np.int32))
        assert drafts[0, :lens[0]].tolist() == oracle.draft(context[:n], params, 8), n


@settings(max_examples=60, deadline=None)
@given(contexts=st.lists(small_tokens, min_size=1, max_size=6), k=st.integers(1, 8))
def test_batch_equals_per_request_calls(contexts, k):
    """Metamorphic: one batched call drafts what separate calls draft."""
    params = AnpdParams(num_speculative_tokens=8)
    width = max(1, max(len(c) for c in contexts))
    rows = np.zeros((len(contexts), width), np.int32)
    for i, c in enumerate(contexts):
        rows[i, :len(c)] = c
    batch = NgramTables(params, num_slots=2, max_batch=2)  # both must grow
    slots = np.array([batch.acquire() for _ in contexts], np.int32)
    d, l = batch.step(rows, np.array([len(c) for c in contexts]), slots, np.full(len(contexts), k, np.int32))
    batched = [d[i, :l[i]].tolist() for i in range(len(contexts))]
    for i, c in enumerate(contexts):
        single = NgramTables(params, num_slots=1, max_batch=1)
        assert run_single(single, single.acquire(), c, k) == batched[i]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=params_strategy, streams=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=80), min_size=2,
                                                max_size=6),
       data=st.data())
def test_batch_of_growing_requests_equals_oracle_at_every_step(params, streams, data):
    """Metamorphic, over many steps: requests of one batch grow by different numbers of tokens per step (so
    their unfolded windows differ), come in a different row order each step, with different draft limits;
    every row's draft equals the oracle's for that request alone. The single-step batch test above cannot see
    what a batch carries from step to step (each row's window of tokens not folded into its tables yet, its
    slot in a new row): a row reading another's state would show here."""
    t = NgramTables(params, num_slots=2, max_batch=2)  # both must grow
    slots = [t.acquire() for _ in streams]
    width = max(len(c) for c in streams)
    lengths = [0] * len(streams)
    while any(n < len(c) for n, c in zip(lengths, streams)):
        before = list(lengths)
        for i, c in enumerate(streams):
            lengths[i] = min(len(c), lengths[i] + data.draw(st.integers(0, 12)))
        if lengths == before:  # every step makes progress
            i = next(i for i, c in enumerate(streams) if lengths[i] < len(c))
            lengths[i] += 1
        order = data.draw(st.permutations(range(len(streams))))
        limits = [data.draw(st.integers(0, params.num_speculative_tokens)) for _ in order]
        rows = np.zeros((len(order), width), np.int32)
        for r, i in enumerate(order):
            rows[r, :len(streams[i])] = streams[i]
        num_tokens = np.array([lengths[i] for i in order])
        row_slots = np.array([slots[i] for i in order], np.int32)
        drafts, lens = t.step(rows, num_tokens, row_slots, np.array(limits, np.int32))
        for r, i in enumerate(order):
            expected = oracle.draft(streams[i][:lengths[i]], params, limits[r])
            assert drafts[r, :lens[r]].tolist() == expected, (r, i, lengths[i])


@settings(max_examples=60, deadline=None)
@given(first=small_tokens, second=small_tokens, k=st.integers(1, 8))
def test_release_then_reuse_leaves_no_trace(first, second, k):
    params = AnpdParams(num_speculative_tokens=8)
    t = NgramTables(params, num_slots=1, max_batch=1)
    s = t.acquire()
    run_single(t, s, first + first, k)
    t.release(s)
    s2 = t.acquire()
    assert s2 == s
    assert run_single(t, s2, second, k) == oracle.draft(second, params, k)
    assert t.meta[s2, 0] == len(second)


def test_shrinking_context_rebuilds_slot():
    """A context shorter than what the slot consumed (another request in the slot) is rebuilt, not mixed."""
    p = AnpdParams(num_speculative_tokens=4)
    t = make_tables(p)
    s = t.acquire()
    run_single(t, s, [1, 2, 3, 1, 2, 3, 1, 2], 4)
    assert run_single(t, s, [9, 8, 9], 4) == oracle.draft([9, 8, 9], p, 4)


# --- limits and edge cases -------------------------------------------------------------------------

def test_draft_limits_and_empty_contexts():
    t = make_tables()
    rows = np.array([[1, 1, 1, 1, 1, 1], [5, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    slots = np.array([t.acquire(), t.acquire(), t.acquire(), -1], np.int32)
    d, l = t.step(rows, np.array([6, 1, 0, 6]), slots, np.array([3, 4, 4, 4], np.int32))
    assert l.tolist() == [3, 0, 0, 0]  # limit respected; one-token, empty and skipped rows draft nothing
    d, l = t.step(rows, np.array([6, 1, 0, 6]), slots, np.array([100, 0, 0, 0], np.int32))
    assert l[0] == K  # clipped to num_speculative_tokens


def test_max_len_cuts_drafts_at_the_model_length_and_lengths_are_counted():
    """``max_len`` (vLLM: max_model_len - 1) bounds context + draft per row, counted from ``num_tokens``; each
    stepped row's draft length is counted in ``draft_lengths`` (skipped rows are not)."""
    context = [1, 2, 3, 4] * 4  # drafts K tokens unbounded
    full = oracle.draft(context, AnpdParams(num_speculative_tokens=K), K)
    assert len(full) == K
    t = make_tables()
    rows = np.array([context] * 3, np.int32)
    slots = np.array([t.acquire(), t.acquire(), -1], np.int32)
    n = np.array([len(context)] * 3)
    lengths = []
    for limit in (len(context) + K + 5, len(context) + K, len(context) + 2, len(context), len(context) - 3):
        d, l = t.step(rows, n, slots, np.full(3, K, np.int32), max_len=limit)
        want = full[:max(0, min(K, limit - len(context)))]
        assert d[0, :l[0]].tolist() == want == d[1, :l[1]].tolist() and l[2] == 0, limit
        lengths += [len(want)] * 2
    assert t.draft_lengths.tolist() == np.bincount(lengths, minlength=K + 1).tolist()


def test_out_of_range_token_ids_are_rejected_with_the_value():
    t = make_tables()
    with pytest.raises(ValueError, match="4294967296"):
        t.step(np.array([[1, 2**32]], np.int64), np.array([2]), np.array([t.acquire()], np.int32),
               np.array([2], np.int32))
    d, l = t.step(np.array([[1, 2, 1]], np.int64), np.array([3]), np.array([0], np.int32),
                  np.array([2], np.int32))  # int64 that fits is accepted
    assert d[0, :l[0]].tolist() == [2, 1]


def test_num_tokens_beyond_row_is_clamped():
    t = make_tables()
    d, l = t.step(np.array([[1, 2, 1]], np.int32), np.array([99]), np.array([t.acquire()], np.int32),
                  np.array([2], np.int32))
    assert d[0, :l[0]].tolist() == [2, 1]


def test_negative_num_tokens_is_an_empty_context_for_that_row_only():
    """A negative count (a caller's bug) drafts nothing for its row, as an empty context does, and leaves the
    other rows and later steps of the same slot as they would be."""
    t = make_tables()
    a, b = t.acquire(), t.acquire()
    rows = np.array([[1, 2, 1, 2, 1], [1, 2, 1, 2, 1]], np.int32)
    slots = np.array([a, b], np.int32)
    d, l = t.step(rows, np.array([-8, 5]), slots, np.array([2, 2], np.int32))
    assert l[0] == 0 and d[1, :l[1]].tolist() == [2, 1]
    d, l = t.step(rows, np.array([5, 5]), slots, np.array([2, 2], np.int32))
    assert d[0, :l[0]].tolist() == [2, 1] == d[1, :l[1]].tolist()


def test_max_entries_bounds_memory_and_counts_drops():
    p = AnpdParams(num_speculative_tokens=4, max_entries_per_request=50)
    t = make_tables(p)
    s = t.acquire()
    rng = np.random.default_rng(0)
    # A small vocabulary: keys get several successors, so the pair table fills up too.
    run_single(t, s, rng.integers(0, 30, 2000).tolist(), 4)
    assert t.meta[s, 1] == 50 and t.meta[s, 2] == 50
    assert t.stats()["dropped_ngrams"] > 0
    # 50 entries fit a 128-row table (75 % load): 128 x 32 key bytes + 128 x 16 pair bytes; plus the copy of
    # the request's tokens (4 bytes each, as vLLM's own token buffer: bounded by the model length; room for a
    # few more steps).
    assert t.slot_bytes(s) - t.contexts[s].nbytes == 128 * 32 + 128 * 16
    assert 2000 * 4 <= t.contexts[s].nbytes <= (2000 + 2 * kernels.MAX_WINDOW) * 4


def test_bytes_in_use_grows_with_context_and_returns_after_release():
    t = make_tables()
    base = t.bytes_in_use()
    s = t.acquire()
    run_single(t, s, np.random.default_rng(1).integers(0, 1000, 5000).tolist(), 4)
    assert t.bytes_in_use() > base + 100_000
    t.release(s)
    assert t.bytes_in_use() == base


@njit
def _scribble(n):
    a = np.empty(n, np.int64)
    a[:] = -1
    return a.ctypes.data


def _leave_freed_memory_dirty(nbytes):
    """Free memory full of -1 where the next allocation of ``nbytes`` (plus its alignment) is likely to land:
    fresh pages from the OS are zero anyway, so only reused memory shows a table that was not zeroed."""
    big = np.full(16 << 17, -1, np.int64)  # freeing a 16 MiB mmapped block raises glibc's mmap threshold,
    del big  # so the next blocks come from (and go back to) the heap
    _scribble(2 * nbytes + kernels.HUGE_PAGE_BYTES)


def test_huge_page_sized_tables_are_aligned_zeroed_and_draft_what_the_oracle_drafts():
    """From 1 MiB on, a table lies in 2 MiB-aligned huge pages, a view of a larger allocation (a 1 MiB table
    that starts a page, as each does here, starts on the boundary; the next test takes a second half). It
    must still be zeroed, C-contiguous and of the asked shape, and a request whose key table grows past 2 MiB
    must draft exactly what the oracle drafts."""
    for rows, columns in [(1 << 16, kernels.KEY_COLUMNS), (1 << 17, kernels.PAIR_COLUMNS), (1 << 18, 4), (16, 4),
                          (1 << 15, kernels.KEY_COLUMNS), (1 << 16, kernels.PAIR_COLUMNS), (1 << 14, 4)]:
        _leave_freed_memory_dirty(rows * columns * 8)
        table = kernels.new_records(rows, columns, _no_spare_half_pages())
        assert table.shape == (rows, columns) and table.dtype == np.int64 and table.flags.c_contiguous
        assert not table.any()
        if table.nbytes >= kernels.HUGE_PAGE_MIN_TABLE_BYTES:
            assert table.ctypes.data % kernels.HUGE_PAGE_BYTES == 0
            # What it lies in: whole huge pages (a 1 MiB table, half of one; alone in it here).
            assert kernels.held_bytes(table.nbytes) == max(table.nbytes, kernels.HUGE_PAGE_BYTES)
        else:
            assert kernels.held_bytes(table.nbytes) == table.nbytes
    params = AnpdParams(num_speculative_tokens=8)
    t = make_tables(params, slots=1, batch=1)
    s = t.acquire()
    # 50 token ids: most 3-token keys of 40k random tokens are new, so the key table passes 2 MiB.
    context = np.random.default_rng(7).integers(0, 50, 40_000).tolist()
    row = np.array([context], np.int32)
    for n in (30_000, 30_001, 30_009, 40_000):  # a long prompt, then steps (and their folds) on the big tables
        drafts, lens = t.step(row, np.array([n]), np.array([s], np.int32), np.array([8], np.int32))
        assert drafts[0, :lens[0]].tolist() == oracle.draft(context[:n], params, 8), n
    assert t.keys[s].nbytes >= kernels.HUGE_PAGE_BYTES
    assert t.keys[s].ctypes.data % kernels.HUGE_PAGE_BYTES == 0


def test_two_1_mib_tables_share_a_huge_page_and_the_second_half_comes_clean():
    """A 1 MiB table takes half a huge page; the next one of the same kind takes the other half, zeroed even
    though the first was filled before; the half is handed out once, and the next table starts a new page.
    A table of the other kind never takes it."""
    half = kernels.HUGE_PAGE_BYTES // 2
    spare = _no_spare_half_pages()
    _leave_freed_memory_dirty(kernels.HUGE_PAGE_BYTES)
    first = kernels.new_records(half // 32, kernels.KEY_COLUMNS, spare)
    assert first.ctypes.data % kernels.HUGE_PAGE_BYTES == 0 and not first.any()
    assert spare[0].nbytes == half and spare[0].ctypes.data == first.ctypes.data + half
    first[:] = -1
    pair_table = kernels.new_records(half // 16, kernels.PAIR_COLUMNS, spare)  # its own page; its half waits
    assert pair_table.ctypes.data % kernels.HUGE_PAGE_BYTES == 0
    assert spare[1].ctypes.data == pair_table.ctypes.data + half and spare[0].nbytes == half
    second = kernels.new_records(half // 32, kernels.KEY_COLUMNS, spare)
    assert second.shape == (half // 32, kernels.KEY_COLUMNS) and second.flags.c_contiguous
    assert second.ctypes.data == first.ctypes.data + half and not second.any()
    # Handed out once, and what is left holds no reference to the page (it must be freed with its tables).
    assert spare[0].size == 0 and _allocation_of(spare[0]) != _allocation_of(first)
    second[:] = 7
    assert (first == -1).all()
    third = kernels.new_records(half // 32, kernels.KEY_COLUMNS, spare)  # no half waits: a new page
    assert third.ctypes.data % kernels.HUGE_PAGE_BYTES == 0 and not third.any()
    assert third.ctypes.data // kernels.HUGE_PAGE_BYTES != first.ctypes.data // kernels.HUGE_PAGE_BYTES
    assert (second == 7).all()


def _table_ranges(t):
    tables = [t.keys[s] for s in range(t.num_slots)] + [t.pairs[s] for s in range(t.num_slots)]
    return sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in tables + list(t.spare_half_pages) if a.nbytes)


def test_requests_sharing_huge_pages_draft_what_the_oracle_drafts_and_are_counted_once():
    """Requests whose 1 MiB key tables share huge pages, over acquire / step / release: every table's memory
    is its own (no two ranges overlap, the spare half included), every draft is the oracle's, and
    ``bytes_in_use`` counts a shared page once, a page whose one table is gone in full, and a page no table
    uses not at all (freed)."""
    params = AnpdParams(num_speculative_tokens=8, cross_request_entries=0)
    t = make_tables(params, slots=4, batch=4)
    base = t.bytes_in_use()
    empty = t.slot_bytes(0)
    rng = np.random.default_rng(5)
    half = kernels.HUGE_PAGE_BYTES // 2

    def step(slots, contexts, lengths):
        row = np.zeros((len(slots), max(len(c) for c in contexts)), np.int32)
        for r, c in enumerate(contexts):
            row[r, :len(c)] = c
        drafts, lens = t.step(row, np.array(lengths), np.array(slots, np.int32), np.full(len(slots), 8, np.int32))
        for r, c in enumerate(contexts):
            assert drafts[r, :lens[r]].tolist() == oracle.draft(c[:lengths[r]], params, 8), (slots[r], lengths[r])
        ranges = _table_ranges(t)
        assert all(end <= nxt for (_, end), (nxt, _) in zip(ranges, ranges[1:])), "two tables overlap"

    # Two prompts of ~10k tokens over 50 ids: each key table ends at 1 MiB, the two on one page.
    a, b = (rng.integers(0, 50, 10_500).tolist() for _ in range(2))
    sa, sb = t.acquire(), t.acquire()
    step([sa, sb], [a, b], [10_000, 10_200])
    assert t.keys[sa].nbytes == t.keys[sb].nbytes == half
    assert t.keys[sa].ctypes.data // kernels.HUGE_PAGE_BYTES == t.keys[sb].ctypes.data // kernels.HUGE_PAGE_BYTES
    assert t.bytes_in_use() == base + t.slot_bytes(sa) + t.slot_bytes(sb) - 2 * empty  # one page, once
    for n in range(1, 40, 3):  # decode steps on both, their folds writing to both halves
        step([sa, sb], [a, b], [10_000 + n, 10_200 + n])
    t.release(sa)
    assert t.bytes_in_use() == base + t.slot_bytes(sb) - empty + half  # b holds the whole page
    # A third request takes a new page; its half-page mate waits as the spare, counted too.
    c = rng.integers(0, 50, 10_500).tolist()
    sc = t.acquire()
    step([sb, sc], [b, c], [10_300, 10_400])
    assert t.spare_half_pages[0].nbytes == half
    assert t.bytes_in_use() == base + t.slot_bytes(sb) + t.slot_bytes(sc) - 2 * empty + 2 * half
    t.release(sb)  # the page of a's and b's tables is gone
    assert t.bytes_in_use() == base + t.slot_bytes(sc) - empty + half  # c's page: c and the spare
    t.release(sc)  # and the spare beside c's table with it: nothing waits for a page no table uses
    assert t.spare_half_pages[0].size == 0 and t.bytes_in_use() == base
    # A request whose 1 MiB key table grows to 2 MiB while its page-mate waits as the spare: the spare goes
    # with it, instead of pinning the page for the next 1 MiB table.
    d = rng.integers(0, 50, 30_000).tolist()
    sd = t.acquire()
    step([sd], [d], [30_000])
    assert t.keys[sd].nbytes == 2 * half
    assert t.spare_half_pages[0].size == 0
    waiting = t.spare_half_pages[1].nbytes  # a 1 MiB pair table's page-mate, if it has one
    assert t.bytes_in_use() == base + t.slot_bytes(sd) - empty + waiting


def _mapping_of(address):
    """AnonHugePages (kB) and VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside, huge_kb, flags = False, None, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
                if inside:
                    break
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                huge_kb = int(line.split()[1])
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
    if huge_kb is None:
        raise AssertionError(f"no mapping holds address {address:#x}")
    return huge_kb, flags or []


def _thp_fallbacks():
    with open("/proc/vmstat") as f:
        return sum(int(v) for k, v in (line.split() for line in f) if k == "thp_fault_fallback")


def test_huge_page_sized_tables_get_huge_pages_where_the_kernel_offers_them():
    """The advice must reach the kernel (a wrong constant or a call that never happens would pass every other
    test): the mapping of a 1 MiB and of a 4 MiB table is advised for huge pages (``hg`` in its VmFlags), and
    backed by them, unless THP is off here or the kernel gave none."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read()
    except OSError:
        pytest.skip("no transparent huge pages on this system (not Linux, or THP not built in)")
    if "[never]" in thp:
        pytest.skip(f"transparent huge pages are off here: {thp.strip()}")
    # 1 MiB (half of a page, which it holds alone here: ``held_bytes`` counts the page), and 4 MiB.
    for rows, expected_kb in [(1 << 15, 2048), (1 << 17, 4096)]:
        fallbacks = _thp_fallbacks()
        table = kernels.new_records(rows, kernels.KEY_COLUMNS, _no_spare_half_pages())
        table[::512, 0] = 1  # touch every 16 KiB: faults every huge page in
        huge_kb, flags = _mapping_of(table.ctypes.data)
        assert "hg" in flags, (rows, flags)  # advised: this is the part the code controls
        assert kernels.held_bytes(table.nbytes) == expected_kb * 1024
        if huge_kb < expected_kb:
            # Advised but not backed: the kernel ran out of huge pages (a fallback is counted), or declined
            # without one (seen once in a full test run, in a process that had run Ray and vLLM engines).
            with open("/proc/self/status") as f:
                thp_status = [line.strip() for line in f if line.startswith("THP")]
            pytest.skip(f"advised, but the kernel backed {huge_kb} of {expected_kb} kB with huge pages "
                        f"(fallbacks: {_thp_fallbacks() - fallbacks}; {thp.strip()}; {thp_status})")
        del table  # unmapped before the next one: its huge pages must not count for the next mapping


def test_stats_acceptance_feedback():
    """The next step scores the previous draft: accepted prefix, per level."""
    p = AnpdParams(num_speculative_tokens=4, n_min=2, n_max=2)
    t = make_tables(p)
    s = t.acquire()
    ctx = [1, 2, 3, 1]
    assert run_single(t, s, ctx, 3) == [2, 3, 1]
    second = run_single(t, s, ctx + [2, 3, 9], 3)  # 2 and 3 accepted, then the model's 9
    st_ = t.stats()
    assert st_["drafted_tokens"] == 3 + len(second)
    assert st_["drafts"] == 1 + (len(second) > 0)
    assert st_["accepted_tokens"] == 2
    assert st_["per_level"]["n=2"]["accepted"] == 2
    assert t.accepted_total[0] == 2


def test_accepted_total_counts_every_request_live_or_released():
    """The batch budget reads ``accepted_total`` (one cell) instead of summing every slot's count: it must
    equal the statistics' total at every step, across releases and slot reuse, with folds on the thread."""
    rng = np.random.default_rng(11)
    p = _AnpdParams(num_speculative_tokens=4, cross_request_entries=0, stop_probability=0.0)
    t = NgramTables(p, num_slots=2, max_batch=4, fold_in_background=True, background_fold_min_rows=1)
    live = {}  # slot -> [stream, tokens so far]
    released = 0
    for step in range(150):
        while len(live) < 3:
            live[t.acquire()] = [(rng.integers(0, 3, 600)).tolist(), int(rng.integers(4, 40))]
        slots = np.array(sorted(live), np.int32)
        rows = np.zeros((len(slots), 600), np.int32)
        for r, s in enumerate(slots):
            live[s][1] += int(rng.integers(1, 6))
            rows[r, :live[s][1]] = live[s][0][:live[s][1]]
        t.step(rows, np.array([live[s][1] for s in slots], np.int32), slots, np.full(len(slots), 4, np.int32))
        assert t.accepted_total[0] == t.stats()["accepted_tokens"], step
        for s in slots:
            if live[s][1] > 300 or rng.random() < 0.05:
                t.release(int(s))
                del live[s]
                released += 1
    assert released >= 5 and t.accepted_total[0] > 100


def test_release_errors_name_the_slot():
    t = make_tables()
    with pytest.raises(ValueError, match="slot=3"):
        t.release(3)


def test_core_does_not_import_vllm():
    code = "import sys, vllm_anpd.core; assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_work_where_numba_cannot_cache_them_on_disk():
    """A read-only file system, or a container whose home is not writable: numba finds nowhere to cache, and
    ``njit(cache=True)`` raises at decoration. The kernels must then compile in the process (with a warning
    that names the fix), not fail the import and with it the engine's start. Every cache location numba
    tries is made unwritable here (as root, permissions cannot show it). Compiles every kernel: ~15 s."""
    code = """
import logging
import numba.core.caching as caching
def not_writable(self):
    raise OSError(30, "Read-only file system")
for name in dir(caching):
    cls = getattr(caching, name)
    if isinstance(cls, type) and hasattr(cls, "ensure_cache_path"):
        cls.ensure_cache_path = not_writable
messages = []
class Records(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logging.getLogger("vllm.anpd").addHandler(Records())
import numpy as np
from vllm_anpd.core import NgramTables, kernels, oracle
from vllm_anpd.core.config import PAPER, AnpdParams
assert kernels.CACHE is False
assert len(messages) == 1 and "NUMBA_CACHE_DIR" in messages[0], messages
params = AnpdParams(**{**PAPER, "num_speculative_tokens": 4})
tables = NgramTables(params, num_slots=2, max_batch=2)
context = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
slot = tables.acquire()
drafts, lens = tables.step(np.array([context], np.int32), np.array([len(context)]), np.array([slot], np.int32),
                           np.array([4], np.int32))
assert drafts[0, :lens[0]].tolist() == oracle.draft(context, params, 4) == [3, 4, 1, 2]
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert kernels.CACHE is True  # here, as on most machines, the kernels are cached


# --- config validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_speculative_tokens=0), "num_speculative_tokens=0"),
    (dict(num_speculative_tokens=1000), "num_speculative_tokens=1000"),
    (dict(n_min=0), "n_min=0"),
    (dict(n_min=4, n_max=3), "n_max=3"),
    (dict(n_max=40), "n_max=40"),
    (dict(min_count=0), "min_count"),
    (dict(min_count=[1, 2]), "min_count"),
    (dict(min_share=1.5), "min_share"),
    (dict(min_share="x"), "min_share"),
    (dict(stop_probability=1.0), "stop_probability=1.0"),
    (dict(verify_cost=-0.1), "verify_cost=-0.1"),
    (dict(measure_verify_cost="yes"), "measure_verify_cost='yes'"),
    (dict(max_entries_per_request=-1), "max_entries_per_request=-1"),
    (dict(n_min=True), "n_min=True"),
])
def test_invalid_params_name_field_and_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
        AnpdParams(**kwargs)


def test_options_are_named_as_the_user_wrote_them():
    """``from_options`` is what the plugin and the benchmarks' ``--anpd`` share: an error about an option names
    it with the caller's prefix, also when the value at fault is a default the option made invalid (n_max after
    n_min); an error about vLLM's own num_speculative_tokens keeps its name."""
    assert "num_speculative_tokens" not in _AnpdParams.option_names()
    assert set(_AnpdParams.option_names()) | {"num_speculative_tokens"} == set(_AnpdParams.field_names())
    assert _AnpdParams.from_options({"n_max": 5}, num_speculative_tokens=3) == _AnpdParams(
        num_speculative_tokens=3, n_max=5)
    with pytest.raises(ValueError, match=r"^anpd_stop_probability=1\.5: "):
        _AnpdParams.from_options({"stop_probability": 1.5})
    with pytest.raises(ValueError, match=r"^x_n_max=7: must be an integer in \[8, 16\]"):
        _AnpdParams.from_options({"n_min": 8}, prefix="x_")
    with pytest.raises(ValueError, match=r"^num_speculative_tokens=0: "):
        _AnpdParams.from_options({}, num_speculative_tokens=0)


def test_per_level_thresholds():
    p = AnpdParams(n_min=2, n_max=4, min_count=[1, 2, 3], min_share=0.5)
    assert p.min_count == (1, 2, 3) and p.min_share == (0.5, 0.5, 0.5)


# --- cross-request table -----------------------------------------------------------------------------

def test_cross_request_table_drafts_from_earlier_outputs():
    p = AnpdParams(num_speculative_tokens=3, n_min=2, n_max=3, cross_request_entries=1000, cross_min_count=2)
    t = make_tables(p)
    a = t.acquire()
    prompt = [50, 51]
    out = [7, 8, 9, 7, 8, 9, 7, 8, 9]
    run_single(t, a, prompt, 0)
    for i in range(1, len(out) + 1):  # generated tokens arrive step by step
        run_single(t, a, prompt + out[:i], 0)
    t.release(a)
    b = t.acquire()
    # Request b never saw 7 -> 8 itself; the shared table did (three times). Its prompt is not shared.
    assert run_single(t, b, [60, 61, 7], 3) == [8, 9, 7]
    assert t.stats()["per_level"]["n=2 (cross-request)"]["drafted"] + \
        t.stats()["per_level"]["n=3 (cross-request)"]["drafted"] == 3
    c = t.acquire()
    assert run_single(t, c, [60, 61, 50], 3) == []  # prompts (50 -> 51) are not shared


def test_cross_request_table_learns_a_step_with_more_new_tokens_than_the_draft_window():
    """A step that brings more new tokens than the draft counts unfolded (a resumed request, a long accepted
    draft) folds them before drafting; its generated tokens must still reach the shared table."""
    p = AnpdParams(num_speculative_tokens=3, n_min=2, n_max=3, cross_request_entries=10_000, cross_min_count=1)
    t = make_tables(p)
    a = t.acquire()
    run_single(t, a, [50, 51], 0)
    out = list(range(100, 100 + kernels.MAX_WINDOW + 8))
    run_single(t, a, [50, 51] + out, 0)  # all generated tokens in one step
    t.release(a)
    b = t.acquire()
    assert run_single(t, b, [60, 61, 110], 3) == [111, 112, 113]


def test_cross_request_candidate_wins_only_with_the_better_acceptance_record():
    """When the request's own tables and the shared table both know a successor, the one whose (level, count,
    share) cell has accepted more often is drafted; with equal records, the request's own."""
    p = AnpdParams(num_speculative_tokens=1, n_min=2, n_max=3, cross_request_entries=1000, cross_min_count=2)
    t = make_tables(p)
    a = t.acquire()
    out = [7, 8, 7, 8, 7, 8]
    run_single(t, a, [1], 0)
    for i in range(1, len(out) + 1):
        run_single(t, a, [1] + out[:i], 0)
    t.release(a)  # the shared table now has 7 -> 8 three times
    own_cell = kernels._cell(0, 1, 1)  # n=2, "7" -> 9 seen once in the request itself
    cross_cell = kernels._cell(p.num_levels + 0, 3, 3)  # n=2 in the shared table, 7 -> 8 three times
    assert own_cell != cross_cell
    b = t.acquire()
    assert run_single(t, b, [7, 9, 5, 7], 1) == [9]  # fresh statistics: equal estimates, own wins
    t.cell_stats[own_cell] = [100, 0]  # the request's single-occurrence keys have stopped being accepted
    c = t.acquire()
    assert run_single(t, c, [7, 9, 5, 7], 1) == [8]
    t.cell_stats[cross_cell] = [100, 0]  # and now the shared table's are worse still
    t.cell_stats[own_cell] = [100, 10]
    d = t.acquire()
    assert run_single(t, d, [7, 9, 5, 7], 1) == [9]


def test_a_request_that_stopped_drafting_gets_another_chance():
    """The per-request calibration scales the learned acceptance estimates by how this request's recent drafts
    fared. Rejections can push it under the stop probability; steps without a draft then forget towards
    neutral, so the request drafts again (before, it could never recover: no draft, no new evidence)."""
    p = AnpdParams(num_speculative_tokens=1, n_min=2, n_max=2, stop_probability=0.5)
    t = make_tables(p)
    s = t.acquire()
    cell = kernels._cell(0, 1, 1)  # the successor of a token seen once in the prompt: every draft below

    def step(ctx):
        t.cell_stats[cell] = [1000, 900]  # the workload's estimate for that cell: 0.9, above the stop
        return run_single(t, s, ctx, 1)

    ctx = list(range(1, 200)) + [10]
    assert step(ctx) == [11]
    drafts = []
    for _ in range(30):  # the model keeps saying t + 2 where the prompt said t + 1: drafts are rejected
        ctx = ctx + [ctx[-1] + 2]
        drafts.append((ctx[-1], step(ctx)))
    assert [d for _, d in drafts[:3]] == [[], [], []]  # 0.9 x this request's ratio (0.53) < 0.5: stopped
    resumed = [(last, d) for last, d in drafts[3:] if d]
    assert resumed and all(d == [last + 1] for last, d in resumed)  # and it drafts again, from the prompt


def test_the_token_the_stop_probability_kept_out_is_scored_without_being_drafted():
    """A draft cut by the stop probability leaves its next token as a shadow: scored in its cell against the
    target's token where verification would have compared it, when every draft token before it was
    accepted. It is not a draft token: the statistics and the batch budget's total do not count it."""
    p = AnpdParams(num_speculative_tokens=4, n_min=2, n_max=2, stop_probability=0.5, cross_request_entries=0)
    t = make_tables(p)
    cell = kernels._cell(0, 1, 1)  # every successor below was seen once
    prompt = [1, 2, 3, 4, 5, 9, 1]

    def two_steps(estimate, following):
        """Draft after the prompt with the cell's record at ``estimate``, then see ``following``."""
        s = t.acquire()
        t.cell_stats[cell] = estimate
        draft = run_single(t, s, prompt, 4)
        drafted, accepted = t.stats()["drafted_tokens"], int(t.accepted_total[0])
        run_single(t, s, prompt + following, 0)
        record = t.cell_stats[cell].tolist()
        assert t.stats()["drafted_tokens"] == drafted
        assert t.accepted_total[0] - accepted == (draft[:1] == following[:1])
        t.release(s)
        return draft, record

    # 0.70 drafts 2; 0.70 x 0.70 < 0.5 keeps 3 out. The model accepts 2 and says 3: both scored as accepted.
    assert two_steps([1000, 700], [2, 3]) == ([2], [1002, 702])
    assert two_steps([1000, 700], [2, 7]) == ([2], [1002, 701])  # ... says 7: the shadow missed
    assert two_steps([1000, 700], [8]) == ([2], [1001, 700])  # 2 rejected: the shadow was not reached
    # An empty draft (its first token kept out) scores its shadow against the next step's one token.
    assert two_steps([1000, 100], [2]) == ([], [1001, 101])
    assert two_steps([1000, 100], [5]) == ([], [1001, 100])
    assert t.stats()["accepted_tokens"] == t.accepted_total[0] == 2


def test_cross_request_table_is_bounded():
    p = AnpdParams(num_speculative_tokens=3, cross_request_entries=200)
    t = make_tables(p)
    rng = np.random.default_rng(5)
    for _ in range(5):
        s = t.acquire()
        ctx = rng.integers(0, 5000, 10).tolist()
        run_single(t, s, ctx, 0)
        for step in range(60):
            ctx = ctx + rng.integers(0, 5000, 2).tolist()
            run_single(t, s, ctx, 3)
            assert t.stats()["cross_request"]["entries"] <= 200
        t.release(s)
    assert t.stats()["cross_request"]["clears"] > 0
    assert t.num_active == 0


def _serve(tables, seed, steps=80, batch=3, vocab=6):
    """A small server's life: requests arrive, generate 1-3 tokens per step (from a tiny vocabulary, so the
    shared table fills, matches and is cleared) and finish. Returns every step's drafts."""
    rng = np.random.default_rng(seed)
    live = {}  # slot -> context
    out = []
    for _ in range(steps):
        while len(live) < batch:
            live[tables.acquire()] = rng.integers(0, vocab, rng.integers(0, 12)).tolist()
        slots = np.array(sorted(live), np.int32)
        for s in slots:
            live[s] = live[s] + rng.integers(0, vocab, rng.integers(1, 4)).tolist()
        width = max(len(live[s]) for s in slots) + 1
        rows = np.zeros((len(slots), width), np.int32)
        for r, s in enumerate(slots):
            rows[r, :len(live[s])] = live[s]
        d, lens = tables.step(rows, np.array([len(live[s]) for s in slots]), slots,
                              np.full(len(slots), 4, np.int32))
        out.append([d[r, :lens[r]].tolist() for r in range(len(slots))])
        rows[:] = -7  # the caller's buffer changes right after the step: the fold must not read it
        for s in slots:
            if rng.random() < 0.15:
                tables.release(int(s))
                del live[s]
    return out


@pytest.mark.parametrize("min_rows", [1, 3])  # every fold in the background; small folds in the step
@pytest.mark.parametrize("seed", range(4))
def test_background_fold_drafts_exactly_what_the_synchronous_fold_drafts(seed, min_rows):
    p = _AnpdParams(num_speculative_tokens=4, n_min=2, n_max=4, cross_request_entries=60, cross_min_count=1)
    sync = NgramTables(p, num_slots=2, max_batch=4)
    background = NgramTables(p, num_slots=2, max_batch=4, fold_in_background=True, background_fold_min_rows=min_rows)
    assert _serve(sync, seed) == _serve(background, seed)
    assert sync.stats() == background.stats()
    assert sync.stats()["cross_request"]["clears"] > 0 and sync.stats()["drafted_tokens"] > 0
    g = sync.cross_slot
    np.testing.assert_array_equal(sync.keys[g], background.keys[g])
    np.testing.assert_array_equal(sync.pairs[g], background.pairs[g])


@pytest.mark.parametrize("seed", range(3))
def test_hot_path_follows_every_array_the_tables_replace(seed):
    """The step reads each slot's arrays through their recorded addresses (``kernels.VIEW_*``), not through
    the lists that own them. Contexts and tables here outgrow their arrays many times (in the step and in
    the background fold), slots are released, reused and added: every draft must still equal the oracle's
    (a stale address would read freed memory: wrong drafts or a crash)."""
    rng = np.random.default_rng(seed)
    p = _AnpdParams(num_speculative_tokens=6, n_min=2, n_max=5, cross_request_entries=0, stop_probability=0.0)
    tables = NgramTables(p, num_slots=1, max_batch=8, fold_in_background=True, background_fold_min_rows=1)
    live = {}  # slot -> the request's whole stream; its first ``n`` tokens are the context so far
    growths = 0
    for step in range(120):
        while len(live) < 5:
            stream = rng.integers(0, 4, 3000).tolist()
            live[tables.acquire()] = [stream, int(rng.integers(0, 400))]
        slots = np.array(sorted(live), np.int32)
        for s in slots:  # a prompt's worth now and then, else a decode step
            live[s][1] += int(rng.integers(30, 300)) if rng.random() < 0.2 else int(rng.integers(1, 8))
        width = max(live[s][1] for s in slots)
        rows = np.zeros((len(slots), width), np.int32)
        for r, s in enumerate(slots):
            rows[r, :live[s][1]] = live[s][0][:live[s][1]]
        before = {int(s): (tables.views[s, kernels.VIEW_KEYS], tables.views[s, kernels.VIEW_CONTEXT])
                  for s in slots}
        drafts, lens = tables.step(rows, np.array([live[s][1] for s in slots]), slots,
                                   np.full(len(slots), 6, np.int32))
        for r, s in enumerate(slots):
            stream, n = live[s]
            assert drafts[r, :lens[r]].tolist() == oracle.draft(stream[:n], p, 6), (step, int(s))
        tables.settle()
        growths += sum((tables.views[s, kernels.VIEW_KEYS], tables.views[s, kernels.VIEW_CONTEXT]) != before[int(s)]
                       for s in slots)
        for s in slots:
            if live[s][1] > 1500 or rng.random() < 0.05:
                tables.release(int(s))
                del live[s]
    assert growths > 50 and tables.num_slots >= 5


@pytest.mark.parametrize("num_slots, max_batch", [(1, 8), (8, 1)])
def test_arrays_replaced_between_steps_are_the_ones_the_next_step_uses(num_slots, max_batch):
    """Slots added (``num_slots=1``) or a batch larger than ``max_batch`` (``max_batch=1``) after steps have run:
    either replaces arrays whose references the step keeps between steps (``_bind_step_args``). Every draft
    must still equal the oracle's. (The test above adds its slots before its first step and never outgrows its
    batch.)"""
    rng = np.random.default_rng(7)
    p = _AnpdParams(num_speculative_tokens=4, n_min=2, n_max=5, cross_request_entries=0, stop_probability=0.0)
    tables = NgramTables(p, num_slots=num_slots, max_batch=max_batch)
    streams = [rng.integers(0, 3, 400).tolist() for _ in range(6)]
    slots = []
    drafted = 0
    for grown in range(len(streams)):
        slots.append(tables.acquire())  # one more request, and a batch one row larger
        for step in range(4):
            lengths = [40 + 25 * grown + 7 * step + 3 * r for r in range(len(slots))]
            rows = np.zeros((len(slots), max(lengths)), np.int32)
            for r, n in enumerate(lengths):
                rows[r, :n] = streams[r][:n]
            drafts, lens = tables.step(rows, np.array(lengths), np.array(slots, np.int32),
                                       np.full(len(slots), 4, np.int32))
            for r, n in enumerate(lengths):
                assert drafts[r, :lens[r]].tolist() == oracle.draft(streams[r][:n], p, 4), (grown, step, r)
                drafted += int(lens[r])
    assert tables.num_slots >= len(streams) and drafted > 0


def test_fold_allocates_nothing_the_step_reserves_its_room(monkeypatch):
    """The fold takes arrays only (cheap to dispatch, GIL-free from its first instruction): ``step`` grows
    the tables it will write to beforehand (``reserve_fold_room``, when ``step_batch`` reports the need). No
    fold may then replace a table or drop an n-gram of an unbounded table, while tables (own and shared) grow
    many times; drafts equal the oracle's."""
    folds = []
    fold_pending_bound = kernels.fold_pending_bound

    def bound_array(state, name):  # the packed array ``name`` (``kernels.bound_state``), read from its address
        i = [n for n, _, _ in kernels.BOUND_ARRAYS].index(name)
        at = len(kernels.BOUND_SCALARS) + kernels.BOUND_RECORD * i
        pointer = ctypes.cast(int(state[at]), ctypes.POINTER(ctypes.c_int64))
        return np.ctypeslib.as_array(pointer, (int(state[at + 1]), int(state[at + 2])))

    def checked_fold(num_pending, state):
        views, meta = bound_array(state, "views"), bound_array(state, "meta")
        before = views.copy(), meta[:, kernels.META_DROPPED].copy()
        out = fold_pending_bound(num_pending, state)
        np.testing.assert_array_equal(views, before[0])
        np.testing.assert_array_equal(meta[:, kernels.META_DROPPED], before[1])
        folds.append(num_pending)
        return out

    monkeypatch.setattr(kernels, "fold_pending_bound", checked_fold)
    rng = np.random.default_rng(4)
    p = _AnpdParams(num_speculative_tokens=5, n_min=2, n_max=5, stop_probability=0.0, cross_min_count=1)
    t = NgramTables(p, num_slots=2, max_batch=4)
    grown = set()
    streams = [rng.integers(0, 50, 2500).tolist() for _ in range(3)]
    slots = np.array([t.acquire() for _ in streams], np.int32)
    n = [20, 300, 5]
    for step in range(400):
        n = [min(len(st_) - 1, m + int(rng.integers(1, 7))) for st_, m in zip(streams, n)]
        rows = np.zeros((3, 2500), np.int32)
        for r, st_ in enumerate(streams):
            rows[r, :n[r]] = st_[:n[r]]
        before = t.views[:, [kernels.VIEW_KEYS + 1, kernels.VIEW_PAIRS + 1]].copy()
        d, l = t.step(rows, np.array(n), slots, np.full(3, 5, np.int32))
        grown |= {int(s) for s in np.flatnonzero((t.views[:, [kernels.VIEW_KEYS + 1, kernels.VIEW_PAIRS + 1]]
                                                  != before).any(axis=1))}
    assert len(folds) >= 390 and t.cross_slot in grown and set(slots.tolist()) <= grown
    assert t.stats()["dropped_ngrams"] == 0
    # The room reserved counts only positions that end a key: a tiny context grows nothing (the engine's soak
    # test measures a one-token request's bytes against a fresh slot's).
    for n in (1, 2, 3):  # each prompt folded at once, as a new request's
        tiny = NgramTables(p, num_slots=1, max_batch=1)
        s = tiny.acquire()
        fresh = tiny.slot_bytes(s)
        tiny.step(np.array([[7, 8, 9]], np.int32), np.array([n]), np.array([s], np.int32), np.array([5], np.int32))
        assert tiny.slot_bytes(s) == fresh, n


@pytest.mark.parametrize("name, replace", [
    ("meta", lambda a: a.astype(np.int32)),  # another dtype
    ("out_drafts", lambda a: np.asfortranarray(np.zeros((a.shape[0], 3), a.dtype))),  # not C-contiguous
    ("out_lens", lambda a: a[:, None]),  # another number of dimensions
])
def test_packed_step_arguments_refuse_an_array_the_kernel_would_misread(name, replace):
    """``step_batch_bound`` rebuilds its arrays from addresses and shapes (``kernels.bound_state``), with no
    type check at the call: so the packing checks each array's dtype, dimensions and layout once, by name."""
    t = NgramTables(_AnpdParams(num_speculative_tokens=3, cross_request_entries=0), num_slots=2, max_batch=2)
    t._bind_step_args()
    arrays = dict(t._step_arrays)
    p = t.params
    scalars = dict(n_min=p.n_min, n_max=p.n_max, cross_slot=t.cross_slot, max_entries=p.max_entries_per_request,
                   cross_max_entries=p.cross_request_entries)
    kernels.bound_state(scalars, arrays)  # as bound
    arrays[name] = replace(arrays[name])
    with pytest.raises(TypeError, match=f"^{name}: "):
        kernels.bound_state(scalars, arrays)


def test_step_kernel_refuses_a_row_that_needs_an_allocation_and_changes_nothing():
    """``step_batch`` takes arrays only (no lists to grow): a row needing an allocation (a long new window, a
    context past its array, a shrunk context) makes it return -1 before it touches anything; ``step`` then
    runs ``prepare_rows`` and drafts as usual."""
    p = _AnpdParams(num_speculative_tokens=4, cross_request_entries=0, stop_probability=0.0)
    t = NgramTables(p, num_slots=1, max_batch=1)
    slot = t.acquire()
    context = [5, 6, 7, 8] * 30
    row = np.array([context], np.int32)
    slots, k = np.array([slot], np.int32), np.array([4], np.int32)
    t.step(row, np.array([40], np.int32), slots, k)
    capacity = t.views[slot, kernels.VIEW_CONTEXT + 1]
    for n in (40 + kernels.MAX_WINDOW + 1, capacity + 1, 30):
        assert n <= len(context), n  # every case must run
        state = [a.copy() for a in (t.meta, t.views, t.calib, t.cell_stats, t.accepted_total, t.last_draft,
                                    t._out_lens, t.draft_lengths)]
        got = kernels.step_batch(row, np.array([n], np.int32), slots, k, 10**9, p.n_min, p.n_max, t._min_count,
                                 t._min_share, t.cross_slot, t._min_count_cross, p.stop_probability,
                                 p.max_entries_per_request, p.cross_request_entries, t.views, t.meta,
                                 t.calib, t.level_stats, t.cell_stats, t.accepted_total, t.last_draft, t.last_cell,
                                 t._out_drafts, t._out_lens, t.draft_lengths, t._pending, 0)
        assert got == (-1, False), n
        for before, after in zip(state, (t.meta, t.views, t.calib, t.cell_stats, t.accepted_total, t.last_draft,
                                         t._out_lens, t.draft_lengths)):
            np.testing.assert_array_equal(before, after)
    for n in (41, 40 + kernels.MAX_WINDOW + 5, 30, len(context)):  # through step: prepared, then drafted
        drafts, lens = t.step(row, np.array([n], np.int32), slots, k)
        assert drafts[0, :lens[0]].tolist() == oracle.draft(context[:n], p, 4), n


def test_only_folds_of_enough_rows_go_to_the_background_thread():
    """Waking the fold thread costs more than folding a few rows in the step: a step whose fold has fewer
    than ``background_fold_min_rows`` rows folds before it returns (no fold in flight), a bigger one hands
    its fold to the thread. Both draft what the synchronous tables draft."""
    p = _AnpdParams(num_speculative_tokens=4, cross_request_entries=0, stop_probability=0.0)
    background = NgramTables(p, num_slots=6, max_batch=6, fold_in_background=True, background_fold_min_rows=3)
    sync = NgramTables(p, num_slots=6, max_batch=6)
    rng = np.random.default_rng(0)
    streams = rng.integers(0, 5, (6, 200)).astype(np.int32)
    slots = {t: np.array([t.acquire() for _ in range(6)], np.int32) for t in (background, sync)}
    k = np.full(6, 4, np.int32)
    for t in (background, sync):  # the prompts: built in the step (prepare_rows), nothing left to fold
        t.step(streams, np.full(6, 50, np.int32), slots[t], k)
    assert not background._fold_thread.busy
    for step, rows in enumerate([6, 2, 2, 3, 1, 6, 4, 2]):  # every row has new tokens to fold
        n = np.full(rows, 53 + 3 * step, np.int32)
        got = {}
        for t in (background, sync):
            drafts, lens = t.step(streams[:rows], n, slots[t][:rows], k[:rows])
            got[t] = [drafts[r, :lens[r]].tolist() for r in range(rows)]
        assert got[background] == got[sync], step
        assert background._fold_thread.busy == (rows >= 3), (step, rows)
        background.settle()
    with pytest.raises(ValueError, match="background_fold_min_rows=0"):
        NgramTables(p, num_slots=1, fold_in_background=True, background_fold_min_rows=0)


def test_fold_thread_can_overlap_only_where_the_caller_may_use_another_cpu(run_bound_to_one_cpu):
    """A thread inherits its creator's CPU affinity; bound to one CPU, a fold thread cannot overlap it."""
    from vllm_anpd.core.tables import fold_thread_can_overlap

    assert run_bound_to_one_cpu(fold_thread_can_overlap) is False
    assert fold_thread_can_overlap() is (len(os.sched_getaffinity(0)) > 1)


def test_fold_thread_ends_with_its_tables_and_hands_errors_to_the_caller():
    import gc
    import threading
    import time

    from vllm_anpd.core.tables import _FoldThread

    def fold_threads():
        return sum(t.name == "anpd-fold" for t in threading.enumerate())

    before = fold_threads()
    t = NgramTables(_AnpdParams(), num_slots=2, fold_in_background=True)
    assert fold_threads() == before + 1
    del t
    gc.collect()
    deadline = time.monotonic() + 5
    while fold_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fold_threads() == before
    worker = _FoldThread()

    def broken():
        raise RuntimeError("fold failed")

    worker.submit(broken)
    with pytest.raises(RuntimeError, match="fold failed"):
        worker.wait()
    worker.wait()  # reported once
    worker.stop()


def test_a_forked_child_folds_on_a_thread_of_its_own():
    """A thread does not survive ``fork``. In the child, a fold in flight in the parent at fork time is not
    waited for (nothing would ever finish it), and the next fold starts the child's own thread: its drafts
    are the parent's for the same steps. (The fork is noticed by a fork hook, not by a system call per step.)"""
    import time

    p = _AnpdParams(num_speculative_tokens=4, cross_request_entries=0, stop_probability=0.0)
    t = NgramTables(p, num_slots=4, max_batch=4, fold_in_background=True, background_fold_min_rows=1)
    streams = np.random.default_rng(1).integers(0, 4, (4, 200)).astype(np.int32)
    slots = np.array([t.acquire() for _ in range(4)], np.int32)
    k = np.full(4, 4, np.int32)

    def steps(first, count):
        out = []
        for n in range(first, first + count):
            drafts, lens = t.step(streams, np.full(4, n, np.int32), slots, k)
            out.append([drafts[r, :lens[r]].tolist() for r in range(4)])
        return out

    steps(40, 5)
    assert t._fold_thread.busy  # the last step's fold is not waited for at the fork ...
    while t._fold_thread._done.empty():  # ... but done (a half-done one would leave the child half a fold)
        time.sleep(0.001)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            t.settle()  # must not wait for the parent's fold
            os.write(write_end, repr(steps(46, 6)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    t.settle()
    expected = steps(46, 6)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung: it waited for a fold thread that does not exist there")
    got = os.read(read_end, 1 << 16).decode()
    os.close(read_end)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert got == repr(expected)


@settings(max_examples=60, deadline=None)
@given(context=small_tokens, cuts=st.lists(st.integers(0, 60), max_size=6), stop=st.sampled_from([0.05, 0.3, 0.6]))
def test_adaptive_stop_only_shortens_drafts(context, cuts, stop):
    """The stop probability decides where a draft ends, never what it contains: each draft is a prefix of the
    fixed-length draft."""
    params = AnpdParams(num_speculative_tokens=8, stop_probability=stop)
    t = NgramTables(params, num_slots=1, max_batch=1)
    slot = t.acquire()
    row = np.zeros((1, max(len(context), 1)), np.int32)
    row[0, :len(context)] = context
    for n in sorted({min(c, len(context)) for c in cuts} | {len(context)}):
        drafts, lens = t.step(row, np.array([n]), np.array([slot], np.int32), np.array([8], np.int32))
        full = oracle.draft(context[:n], params, 8)
        assert drafts[0, :lens[0]].tolist() == full[:lens[0]]


# --- batch budget and the measured verify cost ---------------------------------------------------------

def _steps(model, a, b, tokens, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    for t in tokens:
        model.observe((a + b * t) * (1.0 + noise * rng.standard_normal()), int(t))


def test_step_cost_model_recovers_b_over_a_from_noisy_steps():
    from vllm_anpd.core.budget import StepCostModel

    m = StepCostModel(prior=0.07)
    rng = np.random.default_rng(1)
    _steps(m, a=0.060, b=0.0012, tokens=rng.integers(32, 80, 400), noise=0.03)
    assert m.as_dict()["measured"]
    assert m.b == pytest.approx(0.0012, rel=0.15) and m.a == pytest.approx(0.060, rel=0.1)
    # The value used is on the safe side: at least the estimate, at most a little above the truth.
    assert m.b / m.a <= m.verify_cost <= 1.25 * 0.0012 / 0.060


def test_step_cost_model_keeps_the_prior_until_the_fit_is_identifiable():
    from vllm_anpd.core.budget import MIN_COST_STEPS, StepCostModel

    m = StepCostModel(prior=0.07)
    _steps(m, a=0.06, b=0.001, tokens=[40, 60] * ((MIN_COST_STEPS - 2) // 2))
    assert m.verify_cost == 0.07 and not m.as_dict()["measured"]  # too few steps
    flat = StepCostModel(prior=0.07)
    _steps(flat, a=0.06, b=0.001, tokens=[32] * 500)  # one token count: the slope is not identifiable
    assert flat.verify_cost == 0.07
    free = StepCostModel(prior=0.07)  # verification costs nothing (a GPU at small batch): measured near 0
    _steps(free, a=0.01, b=0.0, tokens=np.arange(300) % 9 + 1, noise=0.01)
    assert free.as_dict()["measured"] and free.verify_cost < 0.01


def test_step_cost_model_ignores_pauses_and_bad_samples():
    from vllm_anpd.core.budget import StepCostModel

    m = StepCostModel(prior=0.07)
    tokens = np.random.default_rng(2).integers(1, 9, 300)
    _steps(m, a=0.05, b=0.005, tokens=tokens)
    before = m.verify_cost
    for t in tokens[:20]:
        m.observe(30.0, int(t))  # the engine sat idle: not a step's cost
    m.observe(-1.0, 5)
    m.observe(0.05, 0)
    assert m.verify_cost == pytest.approx(before, rel=1e-9)
    assert m.verify_cost == pytest.approx(0.1, rel=0.05)


def test_budget_bound_rises_with_batch_and_verify_cost():
    from vllm_anpd.core.budget import BatchBudget

    params = _AnpdParams(num_speculative_tokens=8)
    tables = NgramTables(params, num_slots=2, max_batch=2)

    def bound(batch, cost):
        return BatchBudget(params).stop_probability(batch, tables, cost)

    # batch 1, nothing drafted or accepted yet: the break-even bound 1 / (1 + 1 / cost), or the floor if higher
    assert bound(1, 0.07) == pytest.approx(max(params.stop_probability, 1 / (1 + 1 / 0.07)))
    assert bound(1, 0.01) == params.stop_probability
    assert bound(32, 0.07) > bound(8, 0.07) > params.stop_probability
    assert bound(32, 0.2) > bound(32, 0.07) > bound(32, 0.01)
    assert bound(32, 0.0) == params.stop_probability  # measured free verification: draft as at batch 1
    off = _AnpdParams(num_speculative_tokens=8, verify_cost=0.0)  # 0 configured: the budget is off
    assert BatchBudget(off).stop_probability(32, tables, 0.5) == off.stop_probability
