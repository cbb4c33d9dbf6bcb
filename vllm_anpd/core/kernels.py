"""The hot path: numba kernels that update and draft for a whole batch in one call.

Data layout (one *slot* per live request; see ``tables.py`` for the owner of these arrays):

* ``key_fp[s]``   int64[cap_k]      open-addressing table (linear probing) of n-gram *keys*: a 64-bit
                                    fingerprint of (key length, the n-1 key tokens); 0 marks an empty cell.
* ``key_stat[s]`` int32[cap_k, 3]   per key: top successor token, its count, total successor count.
* ``pair_fp[s]``  int64[cap_p]      table of (key, successor) pairs, fingerprint of (key fp, token).
* ``pair_cnt[s]`` int32[cap_p]      count of that successor after that key.

Because counts only grow by one at a time, the top successor can be maintained incrementally with the
rule "highest count, ties to the most recent": when a successor's count reaches the current top count,
it becomes the top (it is the most recent). So drafting reads one cell per level, and an update costs
O(levels) hash probes per token, never a rescan of the context.

Fingerprints are 64-bit; two different keys sharing one is possible in principle (about 2^-64 per
pair) and would only change a draft, never the output (the target model verifies every draft token).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# --- slot metadata columns (int64[S, META_COLUMNS]) -------------------------------------------------
META_CONSUMED = 0  # tokens of the request already folded into the tables
META_KEYS = 1  # keys in use
META_PAIRS = 2  # pairs in use
META_DROPPED = 3  # n-gram observations dropped because the request hit max_entries_per_request
META_LAST_DRAFT_LEN = 4  # length of the draft proposed at the previous step (for acceptance feedback)
META_DRAFTS = 5  # drafts proposed (non-empty)
META_DRAFTED = 6  # draft tokens proposed
META_ACCEPTED = 7  # draft tokens accepted by the target model
META_GATE_STOPS = 8  # drafts cut short by the confidence gate (a key matched, no level passed the gate)
META_PROB_STOPS = 9  # drafts cut short by the adaptive stop probability
META_CLEARS = 10  # cross-request table only: times it was cleared on reaching its bound
META_COLUMNS = 11

# --- acceptance-probability cells: (level, count bucket, share bucket) ------------------------------
COUNT_BUCKETS = 6  # top count 1, 2-3, 4-7, 8-15, 16-31, 32+
SHARE_BUCKETS = 3  # top share < 0.5, < 0.8, >= 0.8
CELLS_PER_LEVEL = COUNT_BUCKETS * SHARE_BUCKETS

# Prior of every cell's acceptance probability, as pseudo-counts: optimistic (0.75), so that a cell is tried
# (and learned) even when the batch-aware budget demands a high probability; real counts take over quickly.
PRIOR_ACCEPTED = 3.0
PRIOR_REACHED = 4.0

# Per-request calibration is an exponential average over recent verified draft tokens.
CALIBRATION_DECAY = 0.9

MAX_LOAD_NUM, MAX_LOAD_DEN = 3, 4  # tables grow past 75 % load
CONSUME_CHUNK = 512  # tokens folded in per capacity reservation

_K0 = np.uint64(0x9E3779B97F4A7C15)
_K1 = np.uint64(0xD6E8FEB86659FD93)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


@njit(cache=True, inline="always")
def _mix(x):
    # splitmix64 finalizer: every input bit affects every output bit.
    x = (x ^ (x >> _S30)) * _C1
    x = (x ^ (x >> _S27)) * _C2
    return x ^ (x >> _S31)


@njit(cache=True, inline="always")
def _nonzero(h):
    v = np.int64(h)
    return v if v != 0 else np.int64(1)


@njit(cache=True, inline="always")
def key_fingerprints(tokens, end, max_length, out):
    """Fingerprints of every key ending at ``end``: ``out[m]`` for ``tokens[end - m:end]``, m = 0..max_length.

    One rolling pass from the newest token back, one mix per token, so all levels cost about as much as the
    longest key alone. The length is folded in at the end so keys of different lengths never share a chain.
    """
    h = _K1
    out[0] = _nonzero(h ^ _K0)
    for m in range(1, max_length + 1):
        h = _mix(h ^ np.uint64(np.uint32(tokens[end - m])))
        out[m] = _nonzero(h ^ (np.uint64(m + 1) * _K0))


@njit(cache=True, inline="always")
def _pair_fingerprint(key_fp, token):
    return _nonzero(_mix(np.uint64(key_fp) ^ (np.uint64(np.uint32(token)) * _K1 + _K0)))


@njit(cache=True, inline="always")
def _probe(fps, fp):
    """Index of ``fp`` in ``fps`` if present, else ``-1 - (index of the empty cell where it would go)``."""
    mask = fps.size - 1
    i = fp & mask
    while True:
        v = fps[i]
        if v == fp:
            return i
        if v == 0:
            return -1 - i
        i = (i + 1) & mask


@njit(cache=True)
def table_capacity_for(entries):
    """Smallest power-of-two capacity that holds ``entries`` under the maximum load (at least 16)."""
    need = (entries * MAX_LOAD_DEN) // MAX_LOAD_NUM + 1
    cap = 16
    while cap < need:
        cap *= 2
    return cap


@njit(cache=True)
def _grow_keys(fps, stats, new_cap):
    new_fps = np.zeros(new_cap, np.int64)
    new_stats = np.zeros((new_cap, 3), np.int32)
    mask = new_cap - 1
    for i in range(fps.size):
        f = fps[i]
        if f != 0:
            j = f & mask
            while new_fps[j] != 0:
                j = (j + 1) & mask
            new_fps[j] = f
            new_stats[j, 0] = stats[i, 0]
            new_stats[j, 1] = stats[i, 1]
            new_stats[j, 2] = stats[i, 2]
    return new_fps, new_stats


@njit(cache=True)
def _grow_pairs(fps, counts, new_cap):
    new_fps = np.zeros(new_cap, np.int64)
    new_counts = np.zeros(new_cap, np.int32)
    mask = new_cap - 1
    for i in range(fps.size):
        f = fps[i]
        if f != 0:
            j = f & mask
            while new_fps[j] != 0:
                j = (j + 1) & mask
            new_fps[j] = f
            new_counts[j] = counts[i]
    return new_fps, new_counts


@njit(cache=True)
def _entry_limit(cap, max_entries):
    limit = (cap * MAX_LOAD_NUM) // MAX_LOAD_DEN
    if max_entries > 0 and max_entries < limit:
        return max_entries
    return limit


@njit(cache=True)
def _reserve(s, extra, key_fp, key_stat, pair_fp, pair_cnt, meta, max_entries):
    """Grow slot ``s``'s tables (once) so that ``extra`` more entries fit, up to ``max_entries``."""
    want_k = meta[s, META_KEYS] + extra
    want_p = meta[s, META_PAIRS] + extra
    if max_entries > 0:
        want_k = min(want_k, max_entries)
        want_p = min(want_p, max_entries)
    if want_k > _entry_limit(key_fp[s].size, 0):
        new_fps, new_stats = _grow_keys(key_fp[s], key_stat[s], table_capacity_for(want_k))
        key_fp[s] = new_fps
        key_stat[s] = new_stats
    if want_p > _entry_limit(pair_fp[s].size, 0):
        new_fps, new_counts = _grow_pairs(pair_fp[s], pair_cnt[s], table_capacity_for(want_p))
        pair_fp[s] = new_fps
        pair_cnt[s] = new_counts


@njit(cache=True)
def _observe(s, fp, pf, token, kfp, kstat, pfp, pcnt, meta, max_entries):
    """Count one occurrence of ``token`` after the key ``fp`` in slot ``s`` (``pf``: their pair fingerprint)."""
    ki = _probe(kfp, fp)
    if ki < 0:
        if meta[s, META_KEYS] >= _entry_limit(kfp.size, max_entries) or \
                meta[s, META_PAIRS] >= _entry_limit(pfp.size, max_entries):
            meta[s, META_DROPPED] += 1
            return
        ki = -1 - ki
        kfp[ki] = fp
        kstat[ki, 0] = token
        kstat[ki, 1] = 1
        kstat[ki, 2] = 1
        meta[s, META_KEYS] += 1
        pi = -1 - _probe(pfp, pf)
        pfp[pi] = pf
        pcnt[pi] = 1
        meta[s, META_PAIRS] += 1
        return
    pi = _probe(pfp, pf)
    if pi < 0:
        if meta[s, META_PAIRS] >= _entry_limit(pfp.size, max_entries):
            meta[s, META_DROPPED] += 1
            return
        pi = -1 - pi
        pfp[pi] = pf
        pcnt[pi] = 0
        meta[s, META_PAIRS] += 1
    c = pcnt[pi] + 1
    pcnt[pi] = c
    kstat[ki, 2] += 1
    if c >= kstat[ki, 1]:  # ties go to the most recent successor: this one
        kstat[ki, 0] = token
        kstat[ki, 1] = c


@njit(cache=True)
def _consume(s, row, start, end, n_min, n_max, key_fp, key_stat, pair_fp, pair_cnt, meta, max_entries, fps,
             pfps, sink):
    """Fold tokens ``row[start:end]`` (each as a successor of the keys before it) into slot ``s``."""
    num_levels = n_max - n_min + 1
    touched = np.int64(0)
    # Reserve chunk by chunk: a long prompt repeats many n-grams, so reserving levels x length entries
    # up front would over-allocate; doubling per chunk keeps growth amortised O(1) per token.
    for chunk_start in range(start, end, CONSUME_CHUNK):
        chunk_end = min(end, chunk_start + CONSUME_CHUNK)
        _reserve(s, (chunk_end - chunk_start) * num_levels, key_fp, key_stat, pair_fp, pair_cnt, meta,
                 max_entries)
        kfp = key_fp[s]
        kstat = key_stat[s]
        pfp = pair_fp[s]
        pcnt = pair_cnt[s]
        kmask = kfp.size - 1
        pmask = pfp.size - 1
        for pos in range(chunk_start, chunk_end):
            token = row[pos]
            longest = min(n_max - 1, pos)
            if longest < n_min - 1:
                continue
            key_fingerprints(row, pos, longest, fps)
            # The levels' cells are independent: load all of them first so that their cache misses
            # overlap (a long context's tables live in DRAM), then update them one by one.
            for m in range(n_min - 1, longest + 1):
                pfps[m] = _pair_fingerprint(fps[m], token)
                ki = fps[m] & kmask
                pi = pfps[m] & pmask
                touched += kfp[ki] + kstat[ki, 1] + pfp[pi] + pcnt[pi]
            for m in range(n_min - 1, longest + 1):
                _observe(s, fps[m], pfps[m], token, kfp, kstat, pfp, pcnt, meta, max_entries)
    meta[s, META_CONSUMED] = end
    sink[0] += touched


@njit(cache=True)
def _cell(level, top_count, total):
    c = top_count
    b = 0
    while c > 1 and b < COUNT_BUCKETS - 1:
        c >>= 1
        b += 1
    share = top_count / total
    sb = 0 if share < 0.5 else (1 if share < 0.8 else 2)
    return (level * COUNT_BUCKETS + b) * SHARE_BUCKETS + sb


@njit(cache=True, inline="always")
def _cell_probability(cell_stats, cell):
    return (cell_stats[cell, 1] + PRIOR_ACCEPTED) / (cell_stats[cell, 0] + PRIOR_REACHED)


@njit(cache=True)
def _feedback(s, row, start, end, last_draft, last_cell, meta, calib, level_stats, cell_stats):
    """Score the previous draft of slot ``s`` against the tokens the target model produced.

    vLLM appends the accepted draft prefix plus one token of its own, so at most ``end - start - 1``
    draft tokens can have been accepted. A draft token counts as *reached* when every token before it was
    accepted: its acceptance, given that, is what the probability cells estimate.
    """
    n_last = meta[s, META_LAST_DRAFT_LEN]
    if n_last == 0:
        return
    meta[s, META_LAST_DRAFT_LEN] = 0
    accepted = 0
    limit = min(n_last, end - start - 1)
    while accepted < limit and row[start + accepted] == last_draft[s, accepted]:
        accepted += 1
    reached = min(n_last, accepted + 1)
    for j in range(reached):
        cell = last_cell[s, j]
        level = cell // CELLS_PER_LEVEL
        hit = 1 if j < accepted else 0
        cell_stats[cell, 0] += 1
        cell_stats[cell, 1] += hit
        level_stats[s, level, 1] += hit
        p = _cell_probability(cell_stats, cell)
        calib[s, 0] = CALIBRATION_DECAY * calib[s, 0] + p
        calib[s, 1] = CALIBRATION_DECAY * calib[s, 1] + hit
    meta[s, META_ACCEPTED] += accepted


@njit(cache=True)
def _lookup(kfp, kstat, fps, longest, n_min, n_max, min_count, min_share, sink):
    """Highest level whose key (fingerprint ``fps[n - 1]``, keys up to length ``longest``) is in the table
    and passes the gate.

    Returns ``(level index or -1, top token, top count, total count, highest level whose key is in the
    table or -1)``.
    """
    top_lv = min(longest - n_min + 1, n_max - n_min)
    mask = kfp.size - 1
    touched = np.int64(0)
    for lv in range(top_lv, -1, -1):  # start every level's cache misses before walking them in order
        i = fps[n_min + lv - 1] & mask
        touched += kfp[i] + kstat[i, 1]
    sink[0] += touched
    matched = -1
    for lv in range(top_lv, -1, -1):
        ki = _probe(kfp, fps[n_min + lv - 1])
        if ki < 0:
            continue
        if matched < 0:
            matched = lv
        top_count = kstat[ki, 1]
        total = kstat[ki, 2]
        if top_count < min_count[lv] or top_count < min_share[lv] * total:
            continue
        return lv, kstat[ki, 0], top_count, total, matched
    return -1, 0, 0, 0, matched


@njit(cache=True)
def _draft(s, g, r, row, num_tokens, k, n_min, n_max, min_count, min_share, cross_min_count, stop_probability,
           key_fp, key_stat, last_draft, last_cell, meta, calib, level_stats, cell_stats, buf, fps, out, sink):
    """Chain up to ``k`` tokens after ``row[:num_tokens]`` into ``out[r]``; returns the draft length.

    Each token comes from the request's own tables (slot ``s``) or, when none of its levels passes the gate,
    from the cross-request table (slot ``g``, if ``g >= 0``) with its own minimum count. Levels of the
    cross-request table are numbered after the request's own in the statistics.
    """
    num_levels = n_max - n_min + 1
    ctx = min(num_tokens, n_max - 1)
    for i in range(ctx):
        buf[i] = row[num_tokens - ctx + i]
    blen = ctx
    path_p = 1.0
    # Per-request calibration: how this request's recent acceptance compares with the global estimate.
    ratio = (calib[s, 1] + 1.0) / (calib[s, 0] + 1.0)
    ratio = min(max(ratio, 0.25), 2.0)
    n_out = 0
    # A key of length m in the request's own tables implies its prefix of length m - 1 is a key too (both
    # were counted at consecutive positions), so a chained key can be at most one longer than the longest
    # key that matched one token earlier: the levels above cannot match and are not probed. (Not for the
    # cross-request table, which holds generated tokens only, without the prompt tokens before them.)
    own_longest = n_max - 1
    for j in range(k):
        longest = min(blen, n_max - 1)
        key_fingerprints(buf, blen, longest, fps)
        level, top, top_count, total, own_match = _lookup(key_fp[s], key_stat[s], fps, min(longest, own_longest),
                                                          n_min, n_max, min_count, min_share, sink)
        matched = own_match >= 0
        own_longest = max(n_min + own_match, n_min - 1)
        if level < 0 and g >= 0:
            lv, top, top_count, total, cross_match = _lookup(key_fp[g], key_stat[g], fps, longest, n_min, n_max,
                                                             cross_min_count, min_share, sink)
            matched = matched or cross_match >= 0
            if lv >= 0:
                level = num_levels + lv
        if level < 0:
            if matched:
                meta[s, META_GATE_STOPS] += 1
            break
        cell = _cell(level, top_count, total)
        path_p *= min(_cell_probability(cell_stats, cell) * ratio, 0.99)
        if path_p < stop_probability:
            meta[s, META_PROB_STOPS] += 1
            break
        out[r, j] = top
        last_draft[s, j] = top
        last_cell[s, j] = cell
        level_stats[s, level, 0] += 1
        buf[blen] = top
        blen += 1
        n_out += 1
    meta[s, META_LAST_DRAFT_LEN] = n_out
    if n_out > 0:
        meta[s, META_DRAFTS] += 1
        meta[s, META_DRAFTED] += n_out
    return n_out


@njit(cache=True)
def reset_slot(s, key_fp, key_stat, pair_fp, pair_cnt, meta, calib, level_stats, last_draft, last_cell):
    """Erase every trace of slot ``s``'s previous request (tables keep their capacity)."""
    key_fp[s][:] = 0
    key_stat[s][:] = 0
    pair_fp[s][:] = 0
    pair_cnt[s][:] = 0
    meta[s, :] = 0
    calib[s, :] = 0.0
    level_stats[s, :, :] = 0
    last_draft[s, :] = 0
    last_cell[s, :] = 0


@njit(cache=True)
def step_batch(token_ids, num_tokens, slots, max_draft, n_min, n_max, min_count, min_share, cross_slot,
               cross_min_count, cross_max_entries, stop_probability, max_entries, key_fp, key_stat, pair_fp,
               pair_cnt, meta, calib, level_stats, cell_stats, last_draft, last_cell, out_drafts, out_lens):
    """One engine step for a batch: fold new tokens into each request's tables, then draft.

    Row ``r`` of the batch is request slot ``slots[r]`` whose context is ``token_ids[r, :num_tokens[r]]``
    (prompt + every token produced so far). Rows with ``slots[r] < 0`` are skipped. At most
    ``max_draft[r]`` tokens are drafted (0 still updates the tables). Writes ``out_drafts[r, :len]`` and
    ``out_lens[r]``. A context shorter than what the slot already consumed means a different request in
    the slot or rewritten history: the slot is rebuilt from the row.

    ``cross_slot >= 0`` is the cross-request table: every generated token (not the prompt, which the
    request's own table holds) is also folded into it, so later requests can draft from earlier outputs.
    When it reaches ``cross_max_entries`` it is cleared and starts again (bounded memory, recent content).

    Returns a checksum of the table cells loaded ahead of use (to overlap their cache misses); returning
    it keeps the compiler from dropping those loads. Callers ignore it.
    """
    buf = np.empty(n_max - 1 + out_drafts.shape[1], np.int32)  # the chain being drafted
    fps = np.empty(n_max, np.int64)  # key fingerprints of every level at one position
    pfps = np.empty(n_max, np.int64)  # (key, successor) fingerprints of every level at one position
    sink = np.zeros(1, np.int64)
    g = cross_slot
    for r in range(slots.size):
        out_lens[r] = 0
        s = slots[r]
        if s < 0:
            continue
        row = token_ids[r]
        n = min(num_tokens[r], row.size)
        if n < meta[s, META_CONSUMED]:
            reset_slot(s, key_fp, key_stat, pair_fp, pair_cnt, meta, calib, level_stats, last_draft,
                       last_cell)
        start = meta[s, META_CONSUMED]
        if n > start:
            _feedback(s, row, start, n, last_draft, last_cell, meta, calib, level_stats, cell_stats)
            _consume(s, row, start, n, n_min, n_max, key_fp, key_stat, pair_fp, pair_cnt, meta, max_entries, fps,
                     pfps, sink)
            if g >= 0 and start > 0:
                if meta[g, META_KEYS] + (n - start) * (n_max - n_min + 1) > cross_max_entries:
                    _clear_tables(g, key_fp, key_stat, pair_fp, pair_cnt, meta)
                _consume(g, row, start, n, n_min, n_max, key_fp, key_stat, pair_fp, pair_cnt, meta,
                         cross_max_entries, fps, pfps, sink)
        k = min(max_draft[r], out_drafts.shape[1])
        if k <= 0 or n <= 0:
            meta[s, META_LAST_DRAFT_LEN] = 0
            continue
        out_lens[r] = _draft(s, g, r, row, n, k, n_min, n_max, min_count, min_share, cross_min_count,
                             stop_probability, key_fp, key_stat, last_draft, last_cell, meta, calib,
                             level_stats, cell_stats, buf, fps, out_drafts, sink)
    return sink[0]


@njit(cache=True)
def _clear_tables(s, key_fp, key_stat, pair_fp, pair_cnt, meta):
    key_fp[s][:] = 0
    key_stat[s][:] = 0
    pair_fp[s][:] = 0
    pair_cnt[s][:] = 0
    meta[s, META_KEYS] = 0
    meta[s, META_PAIRS] = 0
    meta[s, META_CLEARS] += 1
