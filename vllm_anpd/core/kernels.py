"""The hot path: numba kernels that update and draft for a whole batch in one call.

Data layout (one *slot* per live request; see ``tables.py`` for the owner of these arrays):

* ``keys[s]``  int64[cap_k, 4]   open-addressing table (linear probing) of n-gram *keys*, one 32-byte record
                                  per key: 64-bit fingerprint of (key length, the n-1 key tokens) (0 marks
                                  an empty cell), top successor token, its count, total successor count
                                  (in a request's own tables, ``-1 - position`` for a key seen once: its
                                  longer keys are then implicit, see ``_consume``).
* ``pairs[s]`` int64[cap_p, 2]   table of (key, successor) pairs: fingerprint of (key fp, token), count.
                                  It holds the successors that are *not* their key's top: the top's count
                                  lives in the key record, and a pair cell of the current top is stale.
* ``contexts[s]`` int32[cap]     the request's tokens (positions in the key records refer to it; the fold
                                  reads it, never the caller's buffer).
* ``views[s]``  int64[6]         where those three arrays are: the step reads them through it, without
                                  taking them out of their lists (see ``VIEW_KEYS``).

Because counts only grow by one at a time, the top successor can be maintained incrementally with the
rule "highest count, ties to the most recent": when a successor's count reaches the current top count,
it becomes the top (it is the most recent), and the old top's count moves to the pair table. So drafting
reads one record per level, and an update costs O(levels) hash probes per token, never a rescan of the
context (fewer in a request's own tables: a position's walk up the levels stops at its first new key).
Most observations touch one cache line per level: a key seen for the first time, or followed again by
its top successor, needs no pair cell (in text, most keys have a single successor).

Fingerprints are 64-bit; two different keys sharing one is possible in principle (about 2^-64 per
pair) and would only change a draft, never the output (the target model verifies every draft token).
"""

from __future__ import annotations

import logging
import sys

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic


def _disk_cache_probe():
    return 0


def _disk_cache_available() -> bool:
    """Whether numba can keep these kernels' machine code on disk: beside this file, in ``NUMBA_CACHE_DIR`` or
    in the user's cache directory, whichever is writable. Where none is (a read-only file system, a container
    whose home is not writable), ``njit(cache=True)`` raises at decoration ("no locator available"), which
    would fail the import and the engine's start. Then the kernels are compiled in each process instead."""
    try:
        njit(cache=True)(_disk_cache_probe)
    except RuntimeError as e:
        logging.getLogger("vllm.anpd").warning(
            "ANPD: numba cannot cache its kernels on disk here (%s): they are compiled at each start instead "
            "(about 15 s per process). Set NUMBA_CACHE_DIR to a writable directory to keep them.", e)
        return False
    return True


# numba's on-disk cache: later processes load the kernels in well under a second instead of compiling them.
CACHE = _disk_cache_available()

# --- slot metadata columns (int64[S, META_COLUMNS]) -------------------------------------------------
META_CONSUMED = 0  # tokens of the request already folded into its tables
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
META_SEEN = 11  # tokens of the request copied into its context array (folded: META_CONSUMED, at most this)
META_SHADOW_CELL = 12  # 1 + the cell of the token that the stop probability kept out of the last draft; 0: none
META_COLUMNS = 13

# --- key record columns (int64[cap_k, KEY_COLUMNS]) --------------------------------------------------
KEY_FP = 0  # fingerprint of (key length, key tokens); 0: empty
KEY_TOP = 1  # top successor token
KEY_TOP_COUNT = 2  # its count
KEY_TOTAL = 3  # total successor count; -1 - position for a key of a request's own tables seen once
KEY_COLUMNS = 4
PAIR_COLUMNS = 2  # fingerprint of (key fp, successor), count

# --- borrowed views of each slot's arrays (int64[S, VIEW_COLUMNS]): address and rows -----------------
# The typed lists own the arrays. Taking one out of a list costs two atomic operations on the array's
# reference count, in a cache line the step has not touched since the last one: three arrays per row per
# step, each a miss that no other load can overlap (an atomic operation waits for them). The hot path
# instead views each array from its address here. Every place that replaces an array in a list updates
# its view (``_set_view``): ``refresh_views`` (the Python side's lifecycle), ``_consume`` (table growth),
# ``_grow_context`` (context growth).
VIEW_KEYS = 0  # then VIEW_KEYS + 1: rows
VIEW_PAIRS = 2
VIEW_CONTEXT = 4
VIEW_COLUMNS = 6

# --- acceptance-probability cells: (level, count bucket, share bucket) ------------------------------
COUNT_BUCKETS = 6  # top count 1, 2-3, 4-7, 8-15, 16-31, 32+
SHARE_BUCKETS = 3  # top share < 0.5, < 0.8, >= 0.8
CELLS_PER_LEVEL = COUNT_BUCKETS * SHARE_BUCKETS

# Prior of every cell's acceptance probability, as pseudo-counts: Laplace's rule, (accepted + 1) / (reached + 2).
# It was optimistic (0.75) so that drafts would try, and so measure, each cell even where the batch-aware
# budget asks for more than 0.5; the tokens the stop probability keeps out are now measured without being
# drafted (``_feedback``), so a fresh engine no longer pays draft tokens to explore (replay of sampled
# outputs, batch 32, the first 48 prompts: modelled speedup 0.995 -> 1.004).
PRIOR_ACCEPTED = 1.0
PRIOR_REACHED = 2.0

# The shared table's candidate competes with the request's own only against its lowest levels (keys of 1-2
# tokens at the default n_min = 2): asking it against longer own keys too changed no batch-1 replay figure
# (MAT 2.219 / 2.340 at k = 5 / 8 either way, stop probability 0.1) and cost ~4 % of a 16k x 64 step.
CROSS_COMPETES_BELOW = 2

# Per-request calibration is an exponential average over recent verified draft tokens (about the last 30), and
# decays towards neutral at each step without a draft: otherwise a request whose ratio fell under the budget's
# bound would never draft again, so its ratio could never recover (replay, batch 32: MAT 1.30 -> 1.54).
CALIBRATION_DECAY = 0.97

MAX_LOAD_NUM, MAX_LOAD_DEN = 3, 4  # tables grow past 75 % load

# Helpers called per token or per level are compiled with ``_nrt=False``: they only read and write arrays
# their caller holds, and with numba's reference counting every array argument costs an atomic increment
# and decrement per call (a perf profile of a warm draft step at batch 64: about half its time in them;
# the drafting part of a 16k x 64 step is ~20 % faster without). Functions that allocate, or take a slot's
# table out of a typed list, keep it.

# A step's new tokens are folded into the request's own tables after its draft (off the path between two
# forward passes, see ``step_batch``); the draft counts them by comparing fingerprints. Steps that bring more
# (a prompt, a resumed request) fold them first: counting a long window at every lookup would cost more.
MAX_WINDOW = 32

_K0 = np.uint64(0x9E3779B97F4A7C15)
_K1 = np.uint64(0xD6E8FEB86659FD93)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


@intrinsic
def _prefetch_address(typingctx, address):
    """Ask the CPU to start loading the cache line at ``address`` (an int64), without waiting for it
    (LLVM's ``llvm.prefetch``: a read, kept in all cache levels). A bad address is harmless: a prefetch
    never faults."""
    sig = types.void(address)

    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.inttoptr(args[0], i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


# Tables of 1 MiB and more are placed on 2 MiB boundaries and advised to use huge pages. The step touches a
# few cache lines in each of many requests' multi-MB tables, so with 4 KiB pages nearly every touch is also a
# TLB miss (a 256 x 32k batch spans about 300,000 pages). A table allocated by numba (malloc) is rarely
# aligned, so transparent huge pages (in their default ``madvise`` mode, or even ``always``) seldom cover it.
# Table capacities are powers of two, so a table of 2 MiB or more is whole huge pages and resident memory
# does not grow; the padding that aligns it is never touched. A 1 MiB table (a request's key table from ~10k
# tokens of context) takes half a huge page, and the other half waits, untouched and so still zero, for the
# next 1 MiB table of the same kind, of any slot (``spare``, see ``new_records``): two tables per page, a
# step ~10 % cheaper at 64 x 16k (BENCHMARKS.md section 2) for no memory, except that a page whose one table
# is gone stays held by the other (at most 1 MiB more per such table; ``NgramTables.bytes_in_use`` counts
# it). Same kind, because kinds live differently: reading a prompt of 32k tokens takes its key table through
# 1 MiB to 2 MiB, while its pair table ends at 1 MiB and keeps it; paired, the dead key half would stay held.
# Smaller tables stay in ordinary pages (sharing a page among 4 or more would hold up to 4x their memory).
# Linux only; elsewhere, or with THP ``never``, tables are ordinary pages.
HUGE_PAGE_BYTES = 1 << 21
HUGE_PAGE_MIN_TABLE_BYTES = HUGE_PAGE_BYTES // 2
_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14
_HAS_MADVISE = sys.platform.startswith("linux")


@intrinsic
def _madvise(typingctx, address, length, advice):
    """``madvise(address, length, advice)`` (Linux; int64 arguments, ``address`` page-aligned): 0 if done,
    else -1 (also where there is no madvise)."""
    sig = types.int32(address, length, advice)

    def codegen(context, builder, signature, args):
        i8p, i32, i64 = ir.IntType(8).as_pointer(), ir.IntType(32), ir.IntType(64)
        if not _HAS_MADVISE:
            return i32(-1)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [i8p, i64, i32]), "madvise")
        return builder.call(fn, [builder.inttoptr(args[0], i8p), args[1], builder.trunc(args[2], i32)])

    return sig, codegen


@njit(cache=CACHE, inline="always")
def _prefetch_row(array, i):
    """Start loading the first cache line of ``array[i]``."""
    _prefetch_address(array.ctypes.data + i * array.strides[0])


@intrinsic
def _address_as_pointer(typingctx, address, dtype):
    """``address`` (an int64) as a pointer to ``dtype``, for ``carray``."""
    pointer_type = types.CPointer(dtype.dtype)
    sig = pointer_type(address, dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return sig, codegen


@njit(cache=CACHE, inline="always")
def _set_view(views, s, column, array):
    views[s, column] = array.ctypes.data
    views[s, column + 1] = array.shape[0]


@njit(cache=CACHE)
def refresh_views(s, keys, pairs, contexts, views):
    """Record slot ``s``'s arrays in ``views`` (after the lists' arrays for ``s`` were replaced)."""
    _set_view(views, s, VIEW_KEYS, keys[s])
    _set_view(views, s, VIEW_PAIRS, pairs[s])
    _set_view(views, s, VIEW_CONTEXT, contexts[s])


@njit(cache=CACHE, inline="always")
def _key_table(views, s):
    return carray(_address_as_pointer(views[s, VIEW_KEYS], np.int64), (views[s, VIEW_KEYS + 1], KEY_COLUMNS))


@njit(cache=CACHE, inline="always")
def _pair_table(views, s):
    return carray(_address_as_pointer(views[s, VIEW_PAIRS], np.int64), (views[s, VIEW_PAIRS + 1], PAIR_COLUMNS))


@njit(cache=CACHE, inline="always")
def _context(views, s):
    return carray(_address_as_pointer(views[s, VIEW_CONTEXT], np.int32), views[s, VIEW_CONTEXT + 1])


@njit(cache=CACHE, inline="always")
def _mix(x):
    # splitmix64 finalizer: every input bit affects every output bit.
    x = (x ^ (x >> _S30)) * _C1
    x = (x ^ (x >> _S27)) * _C2
    return x ^ (x >> _S31)


@njit(cache=CACHE, inline="always")
def _nonzero(h):
    v = np.int64(h)
    return v if v != 0 else np.int64(1)


@njit(cache=CACHE, inline="always")
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


@njit(cache=CACHE, inline="always")
def _pair_fingerprint(key_fp, token):
    return _nonzero(_mix(np.uint64(key_fp) ^ (np.uint64(np.uint32(token)) * _K1 + _K0)))


@njit(cache=CACHE, inline="always")
def _probe(table, fp):
    """Row of ``fp`` in ``table`` (fingerprints in column 0) if present, else ``-1 - (the empty row where it
    would go)``."""
    mask = table.shape[0] - 1
    i = fp & mask
    while True:
        v = table[i, 0]
        if v == fp:
            return i
        if v == 0:
            return -1 - i
        i = (i + 1) & mask


@njit(cache=CACHE)
def table_capacity_for(entries):
    """Smallest power-of-two capacity that holds ``entries`` under the maximum load (at least 16)."""
    need = (entries * MAX_LOAD_DEN) // MAX_LOAD_NUM + 1
    cap = 16
    while cap < need:
        cap *= 2
    return cap


@njit(cache=CACHE, _nrt=False)
def held_bytes(nbytes):
    """The huge pages a table of ``nbytes`` lies in, from ``HUGE_PAGE_MIN_TABLE_BYTES`` on (a 1 MiB table's
    page may be shared with another), else its own size."""
    if nbytes < HUGE_PAGE_MIN_TABLE_BYTES:
        return nbytes
    return -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES


@njit(cache=CACHE)
def _huge_pages(nbytes, columns):
    """A zeroed int64[nbytes // (8 x columns), columns] table of whole huge pages (``nbytes``: a multiple of
    ``HUGE_PAGE_BYTES``), 2 MiB-aligned inside a larger allocation that owns it."""
    row_bytes = columns * 8  # 16 or 32: divides HUGE_PAGE_BYTES, so a row boundary falls on the alignment
    padded = np.empty(((nbytes + HUGE_PAGE_BYTES) // row_bytes, columns), np.int64)
    address = padded.ctypes.data
    start = (HUGE_PAGE_BYTES - address % HUGE_PAGE_BYTES) % HUGE_PAGE_BYTES // row_bytes
    table = padded[start:start + nbytes // row_bytes]
    # Advised, then dropped (MADV_DONTNEED), before anything touches them: pages malloc had already faulted
    # in (reused memory) would stay small, and dropped private memory is faulted in afresh, as huge pages,
    # reading as zeros. So the kernel's clearing of each huge page is the table's zeroing (no second pass).
    _madvise(table.ctypes.data, nbytes, _MADV_HUGEPAGE)
    if _madvise(table.ctypes.data, nbytes, _MADV_DONTNEED) != 0:
        table[:] = 0
    return table


@njit(cache=CACHE)
def new_records(rows, columns, spare):
    """A zeroed int64[rows, columns] table. From ``HUGE_PAGE_MIN_TABLE_BYTES`` on, a 2 MiB-aligned view of
    huge pages (see ``HUGE_PAGE_BYTES``). A 1 MiB table is half a page: the waiting half of its width if
    there is one (handed out once: it is replaced by an empty array), else the first half of a new page,
    whose second half then waits. ``spare``: a list owned with the tables, one entry per table width (a
    waiting half, or an empty array of that width); one thread at a time (nothing else may use the tables
    while one grows). A width without an entry gets a whole page per 1 MiB table."""
    nbytes = rows * columns * 8
    if nbytes < HUGE_PAGE_MIN_TABLE_BYTES:
        return np.zeros((rows, columns), np.int64)
    w = _spare_of_width(spare, columns)
    if 2 * nbytes != HUGE_PAGE_BYTES or w < 0:
        return _huge_pages(held_bytes(nbytes), columns)[:rows]
    half = spare[w]
    if half.size:
        # Never touched since the page was dropped (its page-mate's writes stay in the other half): zero.
        spare[w] = np.empty((0, columns), np.int64)  # not half[:0], which would keep the page alive
        return half
    page = _huge_pages(HUGE_PAGE_BYTES, columns)
    spare[w] = page[rows:]
    return page[:rows]


@njit(cache=CACHE)
def _spare_of_width(spare, columns):
    """The entry of ``spare`` for tables of ``columns`` columns, or -1."""
    for w in range(len(spare)):
        if spare[w].shape[1] == columns:
            return w
    return -1


@njit(cache=CACHE)
def forget_spare_beside(table, spare):
    """``table`` is being dropped: if the half page waiting in ``spare`` is its page-mate, forget it too, so
    that the page is freed instead of waiting, half dead, for a table that would hold it all (as a
    request's own 1 MiB key table, outgrown, would pin the page of its next 1 MiB pair table)."""
    w = _spare_of_width(spare, table.shape[1])
    if w < 0 or 2 * table.nbytes != HUGE_PAGE_BYTES:
        return
    half = spare[w]
    if half.size and half.ctypes.data // HUGE_PAGE_BYTES == table.ctypes.data // HUGE_PAGE_BYTES:
        spare[w] = np.empty((0, table.shape[1]), np.int64)


@njit(cache=CACHE)
def _regrow(table, new_cap, spare):
    """``table``'s records rehashed into a new table of ``new_cap`` rows (``spare``: see ``new_records``)."""
    new = new_records(new_cap, table.shape[1], spare)
    forget_spare_beside(table, spare)
    mask = new_cap - 1
    for i in range(table.shape[0]):
        f = table[i, 0]
        if f != 0:
            j = f & mask
            while new[j, 0] != 0:
                j = (j + 1) & mask
            new[j, :] = table[i, :]
    return new


@njit(cache=CACHE, _nrt=False)
def _entry_limit(cap, max_entries):
    limit = (cap * MAX_LOAD_NUM) // MAX_LOAD_DEN
    if max_entries > 0 and max_entries < limit:
        return max_entries
    return limit


@njit(cache=CACHE)
def _grown_capacity(cap, used, extra, max_entries):
    """The capacity ``_room_for`` gives a table of ``cap`` rows holding ``used`` records for ``extra`` more:
    ``cap`` itself when it needs no growth or may not grow."""
    want = used + extra
    if want <= _entry_limit(cap, 0):
        return cap
    grown = max(want, 2 * used)
    if max_entries > 0:
        if used >= max_entries:
            return cap  # full: observations are dropped (and counted) instead
        grown = min(grown, max_entries)
    return max(cap, table_capacity_for(grown))


@njit(cache=CACHE)
def _room_for(table, used, extra, max_entries, spare):
    """``table`` or a grown copy in which ``extra`` more records fit (doubling, so growth is amortised
    O(1) per record), never grown past what ``max_entries`` needs."""
    cap = _grown_capacity(table.shape[0], used, extra, max_entries)
    if cap == table.shape[0]:
        return table
    return _regrow(table, cap, spare)


@njit(cache=CACHE, _nrt=False)
def _pair_row(pairs, pf, meta, s, limit):
    """Row of pair ``pf`` in ``pairs``, inserted with count 0 if new; -1 if new and the table is full."""
    pi = _probe(pairs, pf)
    if pi >= 0:
        return pi
    if meta[s, META_PAIRS] >= limit:
        return -1
    pi = -1 - pi
    pairs[pi, 0] = pf
    pairs[pi, 1] = 0
    meta[s, META_PAIRS] += 1
    return pi


@njit(cache=CACHE, _nrt=False)
def _new_key(s, keys, ki, fp, token, total, meta, max_entries):
    """Store key ``fp`` in the empty row ``-1 - ki`` (what ``_probe`` returned) with one successor ``token``;
    ``total`` is 1, or ``-1 - position`` for a key of the request's own tables seen once (see ``_consume``).
    Returns False, counting a dropped observation, if the table is full."""
    if meta[s, META_KEYS] >= _entry_limit(keys.shape[0], max_entries):
        meta[s, META_DROPPED] += 1
        return False
    ki = -1 - ki
    keys[ki, KEY_FP] = fp
    keys[ki, KEY_TOP] = token
    keys[ki, KEY_TOP_COUNT] = 1
    keys[ki, KEY_TOTAL] = total
    meta[s, META_KEYS] += 1
    return True


@njit(cache=CACHE, _nrt=False)
def _count(s, ki, fp, token, keys, pairs, meta, max_entries):
    """Count one more occurrence of ``token`` after the key ``fp`` stored in row ``ki`` (total >= 1)."""
    top = keys[ki, KEY_TOP]
    if token == top:  # the common case: the top's count lives in the key record
        keys[ki, KEY_TOP_COUNT] += 1
        keys[ki, KEY_TOTAL] += 1
        return
    pair_limit = _entry_limit(pairs.shape[0], max_entries)
    pi = _pair_row(pairs, _pair_fingerprint(fp, token), meta, s, pair_limit)
    if pi < 0:
        meta[s, META_DROPPED] += 1
        return
    c = pairs[pi, 1] + 1
    pairs[pi, 1] = c
    keys[ki, KEY_TOTAL] += 1
    top_count = keys[ki, KEY_TOP_COUNT]
    if c >= top_count:  # ties go to the most recent successor: this one. The old top's count moves out.
        pj = _pair_row(pairs, _pair_fingerprint(fp, top), meta, s, pair_limit)
        if pj >= 0:
            pairs[pj, 1] = top_count
            keys[ki, KEY_TOP] = token
            keys[ki, KEY_TOP_COUNT] = c
        else:  # no cell to keep the old top's count: keep the old top (only in a full, bounded table)
            meta[s, META_DROPPED] += 1


@njit(cache=CACHE)
def _consume(s, row, start, end, n_min, n_max, keys, pairs, spare, views, meta, max_entries, fps, child, sink,
             lazy):
    """Fold tokens ``row[start:end]`` (each as a successor of the keys before it) into slot ``s``.

    ``lazy`` (a request's own tables, whose ``row`` is the request's whole context): a key seen once is
    stored with the position of that occurrence (``KEY_TOTAL = -1 - position``) and its longer keys are not
    stored; they exist implicitly (each was seen once, at that position, followed by the same token), and
    ``_lookup_own`` finds them by comparing tokens. When the key is seen a second time, its one longer key at
    the first occurrence is stored (seen once, so itself lazily), and so on up the levels. A position then
    walks its levels from the shortest key and stops at the first key seen for the first time: in text most
    long keys are new, so this stores about half the records and touches fewer of them, with drafts
    identical to storing every key (the oracle tests). Eager (the cross-request table, which keeps no
    context): every level is counted. ``fps`` and ``child`` are scratch arrays of ``n_max`` fingerprints.

    The tables grow as they fill when ``keys``, ``pairs`` (the lists that own them) and ``spare`` (see
    ``new_records``) are given. With ``None`` for all three (the fold, which takes arrays only), nothing is
    allocated: ``reserve_fold_room`` made the room beforehand.
    """
    num_levels = n_max - n_min + 1
    touched = np.int64(0)
    kt = _key_table(views, s)
    pt = _pair_table(views, s)
    for pos in range(start, end):
        token = row[pos]
        longest = min(n_max - 1, pos)
        if longest < n_min - 1:
            continue
        # Room for this position's records before touching them (the table objects may change).
        if keys is not None and _grows(views, meta, s, num_levels + 1, 2 * num_levels, max_entries):
            _reserve(s, num_levels + 1, 2 * num_levels, max_entries, keys, pairs, spare, views, meta)
            kt = _key_table(views, s)
            pt = _pair_table(views, s)
        key_fingerprints(row, pos, longest, fps)
        # The levels' records are independent: load all of them first so that their cache misses
        # overlap (a long context's tables live in DRAM), then update them one by one.
        kmask = kt.shape[0] - 1
        for m in range(n_min - 1, longest + 1):
            touched += kt[fps[m] & kmask, KEY_TOP]
        for m in range(n_min - 1, longest + 1):
            fp = fps[m]
            ki = _probe(kt, fp)
            if ki < 0:
                if lazy:  # seen for the first time: so are the longer keys here, left implicit
                    _new_key(s, kt, ki, fp, token, -1 - pos, meta, max_entries)
                    break
                _new_key(s, kt, ki, fp, token, 1, meta, max_entries)
                continue
            total = kt[ki, KEY_TOTAL]
            if total < 0:  # seen once before, at ``first``: its longer key there becomes explicit
                first = -1 - total
                kt[ki, KEY_TOTAL] = 1
                if m < n_max - 1 and first > m:
                    key_fingerprints(row, first, m + 1, child)
                    ci = _probe(kt, child[m + 1])
                    if ci < 0:
                        _new_key(s, kt, ci, child[m + 1], row[first], -1 - first, meta, max_entries)
            _count(s, ki, fp, token, kt, pt, meta, max_entries)
    meta[s, META_CONSUMED] = end
    sink[0] += touched


@njit(cache=CACHE, _nrt=False)
def _cell(level, top_count, total):
    c = top_count
    b = 0
    while c > 1 and b < COUNT_BUCKETS - 1:
        c >>= 1
        b += 1
    share = top_count / total
    sb = 0 if share < 0.5 else (1 if share < 0.8 else 2)
    return (level * COUNT_BUCKETS + b) * SHARE_BUCKETS + sb


@njit(cache=CACHE, inline="always")
def _cell_probability(cell_stats, cell):
    return (cell_stats[cell, 1] + PRIOR_ACCEPTED) / (cell_stats[cell, 0] + PRIOR_REACHED)


@njit(cache=CACHE, _nrt=False)
def _feedback(s, row, start, end, last_draft, last_cell, meta, calib, level_stats, cell_stats, accepted_total):
    """Score the previous draft of slot ``s`` against the tokens the target model produced.

    vLLM appends the accepted draft prefix plus one token of its own, so at most ``end - start - 1``
    draft tokens can have been accepted. A draft token counts as *reached* when every token before it was
    accepted: its acceptance, given that, is what the probability cells estimate.

    The token that the stop probability kept out of the draft (its *shadow*, stored after it) is scored in
    its cell too, when reached: against the target's own token after the accepted draft, which is what
    verification would have compared it with (greedy: the same token; sampled: a token drawn from the
    target's distribution, equal to the shadow with the probability that it would have been accepted). So a
    cell under the stop probability keeps being measured without drafting, and cells are learned without
    draft tokens spent on exploring them. Only the cells learn from it: fed to the per-request calibration
    too, shadows made the replay draft 30 % more tokens at batch 32 for a lower modelled speedup.
    """
    n_last = meta[s, META_LAST_DRAFT_LEN]
    shadow = meta[s, META_SHADOW_CELL] - 1
    meta[s, META_LAST_DRAFT_LEN] = 0
    meta[s, META_SHADOW_CELL] = 0
    if n_last == 0:  # no draft to score: forget towards a neutral ratio
        calib[s, 0] *= CALIBRATION_DECAY
        calib[s, 1] *= CALIBRATION_DECAY
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
    if shadow >= 0 and accepted == n_last and end - start > n_last:
        cell_stats[shadow, 0] += 1
        cell_stats[shadow, 1] += 1 if row[start + n_last] == last_draft[s, n_last] else 0
    meta[s, META_ACCEPTED] += accepted
    accepted_total[0] += accepted


@njit(cache=CACHE, _nrt=False)
def _lookup(kt, fps, longest, n_min, n_max, min_count, min_share, level_rows):
    """Highest level whose key (fingerprint ``fps[n - 1]``, keys up to length ``longest``) is in the table
    (one that stores every key: the cross-request table) and passes the gate.

    A key in the table implies its shorter keys are (each position was counted at every level), so the
    levels are walked up from the shortest key and the walk stops at the first key not in the table: most
    chains match short keys only, and the longer levels' cells are never touched.

    Returns ``(level index or -1, top token, top count, total count, highest level whose key is in the
    table or -1)``.
    """
    top_lv = min(longest - n_min + 1, n_max - n_min)
    matched = -1
    for lv in range(top_lv + 1):
        ki = _probe(kt, fps[n_min + lv - 1])
        if ki < 0:
            break
        level_rows[lv] = ki
        matched = lv
    for lv in range(matched, -1, -1):
        ki = level_rows[lv]
        top_count = kt[ki, KEY_TOP_COUNT]
        total = kt[ki, KEY_TOTAL]
        if top_count < min_count[lv] or top_count < min_share[lv] * total:
            continue
        return lv, kt[ki, KEY_TOP], top_count, total, matched
    return -1, 0, 0, 0, matched


@njit(cache=CACHE, _nrt=False)
def _lookup_own(kt, pt, fps, longest, n_min, n_max, min_count, min_share, chain, chain_len, context,
                win_start, win_end, win_fps, level_rows, cand_token, cand_count):
    """``_lookup`` for a request's own tables, which hold ``context[:win_start]`` lazily (see ``_consume``),
    plus the window ``context[win_start:win_end]`` not folded in yet (``win_fps[j, m]``: fingerprint of the
    key of length ``m`` before position ``win_start + j``). The result is what the tables would give with
    the window folded in: the window's occurrences come after every stored one, so they are added with the
    same incremental rule (highest count, ties to the most recent).

    The walk up the levels goes on while the key is stored, or implicit (longer keys of a key seen once,
    found by comparing tokens with its one occurrence), or in the window; ``level_rows[lv]`` keeps each
    level's stored row (-1: not stored, -2: an implicit key, whose successor is that of the key seen once).
    """
    top_lv = min(longest - n_min + 1, n_max - n_min)
    win = win_end - win_start
    matched = -1
    stored = True  # the stored part still matches (a key not stored means no longer key is either)
    once = -1  # row of the key seen once that the implicit keys extend
    first = -1
    for lv in range(top_lv + 1):
        m = n_min + lv - 1
        row = -1
        if stored:
            if once >= 0:
                if m <= first and chain[chain_len - m] == context[first - m]:
                    row = -2
                else:
                    stored = False
            else:
                ki = _probe(kt, fps[m])
                if ki >= 0:
                    row = ki
                    total = kt[ki, KEY_TOTAL]
                    if total < 0:
                        once = ki
                        first = -1 - total
                else:
                    stored = False
        level_rows[lv] = row
        if row == -1:
            in_window = False
            for j in range(win):
                if m <= win_start + j and win_fps[j, m] == fps[m]:
                    in_window = True
                    break
            if not in_window:
                break
        matched = lv
    for lv in range(matched, -1, -1):
        m = n_min + lv - 1
        fp = fps[m]
        ki = level_rows[lv]
        if ki == -1:
            top, top_count, total = 0, 0, 0
        elif ki == -2 or kt[ki, KEY_TOTAL] < 0:  # the key seen once, or one of its implicit longer keys
            top, top_count, total = kt[once, KEY_TOP], 1, 1
            ki = -1  # its only successor is ``top``: no pair cells to read
        else:
            top, top_count, total = kt[ki, KEY_TOP], kt[ki, KEY_TOP_COUNT], kt[ki, KEY_TOTAL]
        candidates = 0
        for j in range(win):
            if m > win_start + j or win_fps[j, m] != fp:
                continue
            token = context[win_start + j]
            if total == 0:
                top, top_count, total = token, 1, 1
                cand_token[0] = token
                cand_count[0] = 1
                candidates = 1
                continue
            if candidates == 0:
                cand_token[0] = top
                cand_count[0] = top_count
                candidates = 1
            c = 0
            while c < candidates and cand_token[c] != token:
                c += 1
            if c == candidates:  # the first time the window has this successor: its stored count, if any
                count = 0
                if ki >= 0:
                    pi = _probe(pt, _pair_fingerprint(fp, token))
                    if pi >= 0:
                        count = pt[pi, 1]
                cand_token[c] = token
                cand_count[c] = count
                candidates += 1
            cand_count[c] += 1
            total += 1
            if token == top:
                top_count = cand_count[c]
            elif cand_count[c] >= top_count:
                top, top_count = token, cand_count[c]
        if top_count < min_count[lv] or top_count < min_share[lv] * total:
            continue
        return lv, top, top_count, total, matched
    return -1, 0, 0, 0, matched


@njit(cache=CACHE, _nrt=False)
def _draft(s, g, r, context, num_tokens, k, n_min, n_max, min_count, min_share, cross_min_count, stop_probability,
           own, own_pairs, cross, last_draft, last_cell, meta, calib, level_stats, cell_stats, buf, fps, out,
           win_start, win_fps, level_rows, cand_token, cand_count):
    """Chain up to ``k`` tokens after ``context[:num_tokens]`` into ``out[r]``; returns the draft length.
    The request's own tables (``own``, ``own_pairs``) hold ``context[:win_start]``; the rest is counted
    from ``win_fps``.

    Each token comes from the request's own tables (slot ``s``) or from the cross-request table (``cross``,
    slot ``g``, if ``g >= 0``, with its own minimum count): the shared table is asked when none of the
    request's levels passes the gate, or when the best that does is one of the ``CROSS_COMPETES_BELOW`` lowest; then its
    candidate wins if its (level, count, share) cell has the higher acceptance estimate (a long key seen in
    many earlier outputs beats a short key seen once in this request; replay: MAT +1.8 % at batch 1).
    Levels of the cross-request table are numbered after the request's own in the statistics and the cells.
    """
    num_levels = n_max - n_min + 1
    ctx = min(num_tokens, n_max - 1)
    for i in range(ctx):
        buf[i] = context[num_tokens - ctx + i]
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
    shadow = -1
    for j in range(k):
        longest = min(blen, n_max - 1)
        key_fingerprints(buf, blen, longest, fps)
        if j > 0:  # the first lookup's cells were loaded ahead (``_prefetch_first_lookups``)
            # Start loading every level's cell at once: the walk up the levels would wait for each in turn.
            for m in range(n_min - 1, min(longest, own_longest) + 1):
                _prefetch_row(own, fps[m] & (own.shape[0] - 1))
            if g >= 0:
                for m in range(n_min - 1, longest + 1):
                    _prefetch_row(cross, fps[m] & (cross.shape[0] - 1))
        level, top, top_count, total, own_match = _lookup_own(
            own, own_pairs, fps, min(longest, own_longest), n_min, n_max, min_count, min_share, buf, blen,
            context, win_start, num_tokens, win_fps, level_rows, cand_token, cand_count)
        matched = own_match >= 0
        own_longest = max(n_min + own_match, n_min - 1)
        cell = _cell(level, top_count, total) if level >= 0 else -1
        if g >= 0 and level < CROSS_COMPETES_BELOW:
            lv, c_top, c_count, c_total, cross_match = _lookup(cross, fps, longest, n_min, n_max,
                                                               cross_min_count, min_share, level_rows)
            matched = matched or cross_match >= 0
            if lv >= 0:
                c_cell = _cell(num_levels + lv, c_count, c_total)
                if cell < 0 or _cell_probability(cell_stats, c_cell) > _cell_probability(cell_stats, cell):
                    level, top, cell = num_levels + lv, c_top, c_cell
        if level < 0:
            if matched:
                meta[s, META_GATE_STOPS] += 1
            break
        path_p *= min(_cell_probability(cell_stats, cell) * ratio, 0.99)
        if path_p < stop_probability:
            meta[s, META_PROB_STOPS] += 1
            last_draft[s, j] = top  # not drafted, but scored at the next step (``_feedback``)
            shadow = cell
            break
        out[r, j] = top
        last_draft[s, j] = top
        last_cell[s, j] = cell
        level_stats[s, level, 0] += 1
        buf[blen] = top
        blen += 1
        n_out += 1
    meta[s, META_LAST_DRAFT_LEN] = n_out
    meta[s, META_SHADOW_CELL] = shadow + 1
    if n_out > 0:
        meta[s, META_DRAFTS] += 1
        meta[s, META_DRAFTED] += n_out
    return n_out


@njit(cache=CACHE)
def reset_slot(s, keys, pairs, meta, calib, level_stats, last_draft, last_cell):
    """Erase every trace of slot ``s``'s previous request (tables keep their capacity)."""
    keys[s][:] = 0
    pairs[s][:] = 0
    meta[s, :] = 0
    calib[s, :] = 0.0
    level_stats[s, :, :] = 0
    last_draft[s, :] = 0
    last_cell[s, :] = 0


@njit(cache=CACHE)
def _grow_context(s, end, contexts, views):
    """Make slot ``s``'s context array hold ``end`` tokens: grown by doubling, and with room for a few decode
    steps after a prompt (each growth costs a step the dispatch of ``prepare_rows``)."""
    ctx = _context(views, s)
    if end > ctx.size:
        grown = np.zeros(max(end + 2 * MAX_WINDOW, 2 * ctx.size), np.int32)
        grown[:ctx.size] = ctx
        contexts[s] = grown
        _set_view(views, s, VIEW_CONTEXT, grown)


@njit(cache=CACHE, inline="always")
def _row_length(num_tokens, r, width):
    """Row ``r``'s context length, clamped to ``[0, width]``: a count beyond the row drafts from the row, and
    a negative one is an empty context (without the lower clamp, such a row asked for an allocation at
    every step and ``NgramTables.step`` raised)."""
    return max(0, min(num_tokens[r], width))


@njit(cache=CACHE, inline="always")
def _take_new_tokens(s, row, n, views, meta, last_draft, last_cell, calib, level_stats, cell_stats,
                     accepted_total):
    """Copy the row's tokens new since the last step into the slot's context (room made before) and score
    the last draft against them. Returns ``(context, tokens seen before)``."""
    seen = meta[s, META_SEEN]
    context = _context(views, s)
    if n > seen:
        context[seen:n] = row[seen:n]
        _feedback(s, context, seen, n, last_draft, last_cell, meta, calib, level_stats, cell_stats, accepted_total)
        meta[s, META_SEEN] = n
    return context, seen


@njit(cache=CACHE, inline="always")
def _add_pending(pending, i, s, start, end, cross_start):
    pending[i, 0] = s
    pending[i, 1] = start
    pending[i, 2] = end
    pending[i, 3] = cross_start


@njit(cache=CACHE)
def prepare_rows(token_ids, num_tokens, slots, n_min, n_max, max_entries, cross_slot, keys, pairs, spare, contexts,
                 views, meta, calib, level_stats, cell_stats, accepted_total, last_draft, last_cell, pending,
                 num_pending):
    """The part of a step that may allocate, for the rows that need it; ``step_batch`` does the rest.

    A row whose context is shorter than what its slot has seen (a different request in the slot, or
    rewritten history) gets its slot rebuilt; a context array too small for the row is grown; a row that
    brings more than ``MAX_WINDOW`` tokens not in the tables yet (a prompt, a resumed request) has them
    folded now, in order: copied, the last draft scored, folded into the request's tables (growing them),
    and its generated tokens queued for the cross-request table in ``pending[num_pending:]``. Returns
    ``(new num_pending, checksum)``: the checksum sums table cells loaded ahead of use (returning it keeps
    the compiler from dropping those loads).
    """
    fps = np.empty(n_max, np.int64)
    child = np.empty(n_max, np.int64)
    sink = np.zeros(1, np.int64)
    g = cross_slot
    for r in range(slots.size):
        s = slots[r]
        if s < 0:
            continue
        row = token_ids[r]
        n = _row_length(num_tokens, r, row.size)
        if n < meta[s, META_SEEN]:
            reset_slot(s, keys, pairs, meta, calib, level_stats, last_draft, last_cell)
        _grow_context(s, n, contexts, views)
        if n - meta[s, META_CONSUMED] <= MAX_WINDOW:
            continue
        context, seen = _take_new_tokens(s, row, n, views, meta, last_draft, last_cell, calib, level_stats,
                                         cell_stats, accepted_total)
        _consume(s, context, meta[s, META_CONSUMED], n, n_min, n_max, keys, pairs, spare, views, meta, max_entries,
                 fps, child, sink, True)
        if g >= 0 and 0 < seen < n:  # generated tokens, not a prompt
            _add_pending(pending, num_pending, s, n, n, seen)
            num_pending += 1
    return num_pending, sink[0]


@njit(cache=CACHE)
def _rows_ready(token_ids, num_tokens, slots, views, meta):
    """Whether ``step_batch`` can take every row without allocating (else ``prepare_rows`` comes first)."""
    for r in range(slots.size):
        s = slots[r]
        if s < 0:
            continue
        n = _row_length(num_tokens, r, token_ids.shape[1])
        if n < meta[s, META_SEEN] or n > views[s, VIEW_CONTEXT + 1] or n - meta[s, META_CONSUMED] > MAX_WINDOW:
            return False
    return True


# Before the row loop, ``step_batch`` starts loading what each row's bookkeeping and first lookup read: cells
# that nothing has touched since the last step (the forward pass in between evicts them; a long context's
# tables live in DRAM). Loaded one row at a time, each row would wait for its misses in turn; started for all
# rows first, they overlap. Two rounds: the slots' small records and the tails of the caller's token rows
# (which the readiness check and the second round read), then the context tails and the table cells.

@njit(cache=CACHE)
def _prefetch_slot_records(token_ids, num_tokens, slots, views, meta, calib, level_stats, last_draft, last_cell):
    for r in range(slots.size):
        s = slots[r]
        if s < 0:
            continue
        n = _row_length(num_tokens, r, token_ids.shape[1])
        if n > 0:  # the tail of the row: its new tokens, and the first lookup's key (the second round reads it)
            _prefetch_address(token_ids.ctypes.data + r * token_ids.strides[0] + (n - 1) * token_ids.strides[1])
        _prefetch_row(views, s)
        _prefetch_row(meta, s)
        _prefetch_row(calib, s)
        _prefetch_row(level_stats, s)
        _prefetch_row(last_draft, s)
        _prefetch_row(last_cell, s)


@njit(cache=CACHE)
def _prefetch_first_lookups(token_ids, num_tokens, slots, max_draft, n_min, n_max, views, cross, fps):
    for r in range(slots.size):
        s = slots[r]
        n = _row_length(num_tokens, r, token_ids.shape[1])
        if s < 0 or n < n_min - 1 or max_draft[r] <= 0:
            continue
        _prefetch_address(views[s, VIEW_CONTEXT] + 4 * (n - 1))  # where the new tokens are copied
        longest = min(n, n_max - 1)
        key_fingerprints(token_ids[r], n, longest, fps)
        kt = _key_table(views, s)
        for m in range(n_min - 1, longest + 1):
            _prefetch_row(kt, fps[m] & (kt.shape[0] - 1))
            if cross.shape[0]:
                _prefetch_row(cross, fps[m] & (cross.shape[0] - 1))


@njit(cache=CACHE)
def step_batch(token_ids, num_tokens, slots, max_draft, max_len, n_min, n_max, min_count, min_share, cross_slot,
               cross_min_count, stop_probability, max_entries, cross_max_entries, views, meta, calib, level_stats,
               cell_stats, accepted_total, last_draft, last_cell, out_drafts, out_lens, draft_lengths, pending,
               num_pending):
    """One engine step for a batch: score the last drafts, then draft; the tables learn afterwards.

    Row ``r`` of the batch is request slot ``slots[r]`` whose context is ``token_ids[r, :num_tokens[r]]``
    (prompt + every token produced so far). Rows with ``slots[r] < 0`` are skipped. At most
    ``max_draft[r]`` tokens are drafted (0 still updates the tables), and none past ``max_len`` tokens of
    context plus draft (counted from ``num_tokens[r]``). Writes ``out_drafts[r, :len]`` and ``out_lens[r]``,
    and counts each row's draft length in ``draft_lengths``.

    The tokens new since the last step are copied into the slot's context array, and drafted from without
    being folded into the tables yet (up to ``MAX_WINDOW`` of them: ``_lookup_own`` counts them). Folding
    them, and every generated token into the cross-request table (slot ``cross_slot >= 0``; not the prompt,
    which the request's own tables hold), is queued in ``pending[num_pending:]`` (rows of ``(slot, first token
    to fold into its tables, end, first token to fold into the cross-request table or -1)``) for
    ``fold_pending``: work that can run while the target model verifies the drafts, off the path between two
    forward passes. The drafts are the same either way. Until ``fold_pending`` has run, nothing else may use
    the tables.

    Nothing here allocates a table or takes one out of its list, so the call takes arrays only (numba's
    dispatch of typed lists costs tens of microseconds when the caches are cold, as after a forward pass). If
    a row needs an allocation (see ``prepare_rows``), nothing is changed and ``(-1, False)`` is returned;
    else ``(the new num_pending, whether the fold needs reserve_fold_room first)``.
    """
    _prefetch_slot_records(token_ids, num_tokens, slots, views, meta, calib, level_stats, last_draft, last_cell)
    if not _rows_ready(token_ids, num_tokens, slots, views, meta):
        return -1, False
    buf = np.empty(n_max - 1 + out_drafts.shape[1], np.int32)  # the chain being drafted
    fps = np.empty(n_max, np.int64)  # key fingerprints of every level at one position
    win_fps = np.empty((MAX_WINDOW, n_max), np.int64)  # ... at every position of the window
    level_rows = np.empty(n_max, np.int64)  # a lookup's table row per level
    cand_token = np.empty(MAX_WINDOW + 1, np.int32)  # successors of one key, while counting the window
    cand_count = np.empty(MAX_WINDOW + 1, np.int64)
    g = cross_slot
    cross = _key_table(views, g if g >= 0 else 0)
    _prefetch_first_lookups(token_ids, num_tokens, slots, max_draft, n_min, n_max, views,
                            cross if g >= 0 else cross[:0], fps)
    for r in range(slots.size):
        out_lens[r] = 0
        s = slots[r]
        if s < 0:
            continue
        row = token_ids[r]
        n = _row_length(num_tokens, r, row.size)
        context, seen = _take_new_tokens(s, row, n, views, meta, last_draft, last_cell, calib, level_stats,
                                         cell_stats, accepted_total)
        start = meta[s, META_CONSUMED]
        cross_start = seen if g >= 0 and 0 < seen < n else -1  # generated tokens, not a prompt
        if n > start or cross_start >= 0:
            _add_pending(pending, num_pending, s, start, n, cross_start)
            num_pending += 1
        k = min(max_draft[r], out_drafts.shape[1], max_len - num_tokens[r])
        if k <= 0 or n <= 0:
            meta[s, META_LAST_DRAFT_LEN] = 0
            meta[s, META_SHADOW_CELL] = 0
            draft_lengths[0] += 1
            continue
        for j in range(n - start):
            key_fingerprints(context, start + j, min(n_max - 1, start + j), win_fps[j])
        out_lens[r] = _draft(s, g, r, context, n, k, n_min, n_max, min_count, min_share, cross_min_count,
                             stop_probability, _key_table(views, s), _pair_table(views, s), cross,
                             last_draft, last_cell, meta, calib,
                             level_stats, cell_stats, buf, fps, out_drafts, start, win_fps,
                             level_rows, cand_token, cand_count)
        draft_lengths[out_lens[r]] += 1
    return num_pending, fold_needs_room(pending[:num_pending], n_min, n_max, max_entries, g, cross_max_entries,
                                        views, meta)


# ``step_batch``'s own arrays and limits, packed into one int64 array (``NgramTables._bind_step_args`` builds it,
# ``step_batch_bound`` unpacks it). Right after a forward pass numba's dispatch costs about 1 us per argument
# (a probe on the Intel Xeon VM, caches evicted: a function that does nothing, 57 us with step_batch's 28
# arguments, 31 us with 8), so a step passes the caller's four arrays and this one. Scalars first, then one
# record per array: its address and up to three dimensions. The arrays must be C-contiguous, of the dtypes
# and dimensions of ``BOUND_ARRAYS``, and outlive every step that uses the record (the tables keep them).
BOUND_SCALARS = ("n_min", "n_max", "cross_slot", "max_entries", "cross_max_entries")
BOUND_ARRAYS = (("min_count", np.int32, 1), ("min_share", np.float64, 1), ("cross_min_count", np.int32, 1),
                ("views", np.int64, 2), ("meta", np.int64, 2), ("calib", np.float64, 2),
                ("level_stats", np.int64, 3), ("cell_stats", np.int64, 2), ("accepted_total", np.int64, 1),
                ("last_draft", np.int32, 2), ("last_cell", np.int32, 2), ("out_drafts", np.int32, 2),
                ("out_lens", np.int32, 1), ("draft_lengths", np.int64, 1), ("pending", np.int64, 2))
BOUND_RECORD = 4  # address, then three dimensions (unused ones 1)
# Positions in the packed state, by name, so that the two unpacking kernels below cannot drift from the tuples
# above (numba reads module-level integers as constants: these cost nothing in the kernels).
_BOUND_AT = {name: i for i, name in enumerate(BOUND_SCALARS)}
_BOUND_AT.update((name, len(BOUND_SCALARS) + BOUND_RECORD * i) for i, (name, _, _) in enumerate(BOUND_ARRAYS))
_N_MIN, _N_MAX, _CROSS_SLOT = _BOUND_AT["n_min"], _BOUND_AT["n_max"], _BOUND_AT["cross_slot"]
_MAX_ENTRIES, _CROSS_MAX_ENTRIES = _BOUND_AT["max_entries"], _BOUND_AT["cross_max_entries"]
_MIN_COUNT, _MIN_SHARE, _CROSS_MIN_COUNT = _BOUND_AT["min_count"], _BOUND_AT["min_share"], _BOUND_AT["cross_min_count"]
_VIEWS, _META, _CALIB = _BOUND_AT["views"], _BOUND_AT["meta"], _BOUND_AT["calib"]
_LEVEL_STATS, _CELL_STATS, _ACCEPTED_TOTAL = (_BOUND_AT["level_stats"], _BOUND_AT["cell_stats"],
                                              _BOUND_AT["accepted_total"])
_LAST_DRAFT, _LAST_CELL, _OUT_DRAFTS = _BOUND_AT["last_draft"], _BOUND_AT["last_cell"], _BOUND_AT["out_drafts"]
_OUT_LENS, _DRAFT_LENGTHS, _PENDING = _BOUND_AT["out_lens"], _BOUND_AT["draft_lengths"], _BOUND_AT["pending"]


def bound_state(scalars: dict, arrays: dict) -> np.ndarray:
    """The packed form of ``step_batch``'s own arguments (plain Python: it runs when an array is replaced, not
    per step). Refuses an array that ``step_batch_bound`` would read as something else."""
    state = np.zeros(len(BOUND_SCALARS) + BOUND_RECORD * len(BOUND_ARRAYS), np.int64)
    for name in BOUND_SCALARS:
        state[_BOUND_AT[name]] = scalars[name]
    for name, dtype, ndim in BOUND_ARRAYS:
        a = arrays[name]
        if a.dtype != dtype or a.ndim != ndim or not a.flags.c_contiguous:
            raise TypeError(f"{name}: {a.dtype}[{a.ndim}d] (C-contiguous: {a.flags.c_contiguous}), expected "
                            f"C-contiguous {np.dtype(dtype)}[{ndim}d]")
        at = _BOUND_AT[name]
        state[at] = a.ctypes.data
        state[at + 1:at + 1 + ndim] = a.shape
        state[at + 1 + ndim:at + BOUND_RECORD] = 1
    return state


@njit(cache=CACHE, inline="always")
def _bound_1d(state, at, dtype):
    return carray(_address_as_pointer(state[at], dtype), state[at + 1])


@njit(cache=CACHE, inline="always")
def _bound_2d(state, at, dtype):
    return carray(_address_as_pointer(state[at], dtype), (state[at + 1], state[at + 2]))


@njit(cache=CACHE, inline="always")
def _bound_3d(state, at, dtype):
    return carray(_address_as_pointer(state[at], dtype), (state[at + 1], state[at + 2], state[at + 3]))


@njit(cache=CACHE)
def step_batch_bound(token_ids, num_tokens, slots, max_draft, max_len, stop_probability, num_pending, state):
    """``step_batch`` with its own arrays and limits from ``state`` (``bound_state``): 8 arguments to dispatch
    instead of 28."""
    return step_batch(token_ids, num_tokens, slots, max_draft, max_len, state[_N_MIN], state[_N_MAX],
                      _bound_1d(state, _MIN_COUNT, np.int32), _bound_1d(state, _MIN_SHARE, np.float64),
                      state[_CROSS_SLOT], _bound_1d(state, _CROSS_MIN_COUNT, np.int32), stop_probability,
                      state[_MAX_ENTRIES], state[_CROSS_MAX_ENTRIES],
                      _bound_2d(state, _VIEWS, np.int64), _bound_2d(state, _META, np.int64),
                      _bound_2d(state, _CALIB, np.float64), _bound_3d(state, _LEVEL_STATS, np.int64),
                      _bound_2d(state, _CELL_STATS, np.int64), _bound_1d(state, _ACCEPTED_TOTAL, np.int64),
                      _bound_2d(state, _LAST_DRAFT, np.int32), _bound_2d(state, _LAST_CELL, np.int32),
                      _bound_2d(state, _OUT_DRAFTS, np.int32), _bound_1d(state, _OUT_LENS, np.int32),
                      _bound_1d(state, _DRAFT_LENGTHS, np.int64), _bound_2d(state, _PENDING, np.int64),
                      num_pending)


@njit(cache=CACHE, nogil=True)
def fold_pending(pending, n_min, n_max, max_entries, cross_slot, cross_max_entries, views, meta):
    """Fold what a ``step_batch`` left pending into the tables: each request's new tokens into its own
    tables, its generated tokens into the cross-request table (cleared and restarted when it reaches
    ``cross_max_entries``: bounded memory, recent content).

    Arrays only, and it allocates nothing: when ``step_batch`` reports that a table must grow first,
    ``reserve_fold_room`` grows it before (on the same thread). So the call is cheap to dispatch, and
    it releases the GIL: the caller may run it on a background thread, as long as nothing else reads or
    writes the tables until it returns. Returns a checksum, as ``step_batch``.
    """
    fps = np.empty(n_max, np.int64)
    child = np.empty(n_max, np.int64)
    sink = np.zeros(1, np.int64)
    g = cross_slot
    for i in range(pending.shape[0]):
        s, start, end, cross_start = pending[i, 0], pending[i, 1], pending[i, 2], pending[i, 3]
        context = _context(views, s)
        if end > start:
            _consume(s, context, start, end, n_min, n_max, None, None, None, views, meta, max_entries, fps, child, sink,
                     True)
        if g >= 0 and cross_start >= 0:
            if meta[g, META_KEYS] + (end - cross_start) * (n_max - n_min + 1) > cross_max_entries:
                _clear_tables(g, views, meta)
            _consume(g, context, cross_start, end, n_min, n_max, None, None, None, views, meta, cross_max_entries, fps,
                     child, sink, False)
    return sink[0]


@njit(cache=CACHE, nogil=True)
def fold_pending_bound(num_pending, state):
    """``fold_pending`` of the first ``num_pending`` rows that ``step_batch_bound`` left in its pending array,
    with the limits and arrays from ``state`` (``bound_state``): the caller slices no array on the step's path
    (right after a forward pass, a numpy slice costs ~10 us)."""
    return fold_pending(_bound_2d(state, _PENDING, np.int64)[:num_pending], state[_N_MIN], state[_N_MAX],
                        state[_MAX_ENTRIES], state[_CROSS_SLOT], state[_CROSS_MAX_ENTRIES],
                        _bound_2d(state, _VIEWS, np.int64), _bound_2d(state, _META, np.int64))


@njit(cache=CACHE)
def _clear_tables(s, views, meta):
    _key_table(views, s)[:] = 0
    _pair_table(views, s)[:] = 0
    meta[s, META_KEYS] = 0
    meta[s, META_PAIRS] = 0
    meta[s, META_CLEARS] += 1


@njit(cache=CACHE, inline="always")
def _fold_records(start, end, n_min, n_max):
    """The most (key, pair) records that folding tokens ``start..end-1`` of a context can add to a table: a
    position with ``levels`` keys ending before it adds at most ``levels + 1`` keys (a new one, and the longer
    key of an earlier occurrence made explicit) and ``2 x levels`` pairs (a successor, and the old top's
    count moved out)."""
    keys = 0
    pairs = 0
    for pos in range(max(start, n_min - 1), end):
        levels = min(n_max - 1, pos) - n_min + 2
        keys += levels + 1
        pairs += 2 * levels
    return keys, pairs


@njit(cache=CACHE, inline="always")
def _grows(views, meta, s, keys, pairs, max_entries):
    """Whether ``keys`` and ``pairs`` more records could make one of slot ``s``'s tables grow."""
    kcap = views[s, VIEW_KEYS + 1]
    pcap = views[s, VIEW_PAIRS + 1]
    return (_grown_capacity(kcap, meta[s, META_KEYS], keys, max_entries) != kcap
            or _grown_capacity(pcap, meta[s, META_PAIRS], pairs, max_entries) != pcap)


@njit(cache=CACHE)
def _reserve(s, keys_needed, pairs_needed, max_entries, keys, pairs, spare, views, meta):
    kt = _room_for(keys[s], meta[s, META_KEYS], keys_needed, max_entries, spare)
    if kt.shape[0] != views[s, VIEW_KEYS + 1]:
        keys[s] = kt
        _set_view(views, s, VIEW_KEYS, kt)
    pt = _room_for(pairs[s], meta[s, META_PAIRS], pairs_needed, max_entries, spare)
    if pt.shape[0] != views[s, VIEW_PAIRS + 1]:
        pairs[s] = pt
        _set_view(views, s, VIEW_PAIRS, pt)


@njit(cache=CACHE)
def _fold_room(pending, n_min, n_max, max_entries, cross_slot, cross_max_entries, keys, pairs, spare, views, meta):
    """Walk the tables ``fold_pending(pending, ...)`` will write to, with the most records its tokens can add.
    With ``None`` for ``keys``, ``pairs`` and ``spare``: whether one of them would have to grow. With the lists
    that own the tables (and ``spare``, see ``new_records``): grow those that must (and return False)."""
    cross_keys = 0
    cross_pairs = 0
    for i in range(pending.shape[0]):
        s, start, end, cross_start = pending[i, 0], pending[i, 1], pending[i, 2], pending[i, 3]
        if end > start:
            keys_needed, pairs_needed = _fold_records(start, end, n_min, n_max)
            if _grows(views, meta, s, keys_needed, pairs_needed, max_entries):
                if keys is None:
                    return True
                _reserve(s, keys_needed, pairs_needed, max_entries, keys, pairs, spare, views, meta)
        if cross_slot >= 0 and cross_start >= 0:
            keys_needed, pairs_needed = _fold_records(cross_start, end, n_min, n_max)
            cross_keys += keys_needed
            cross_pairs += pairs_needed
    if cross_keys > 0 and _grows(views, meta, cross_slot, cross_keys, cross_pairs, cross_max_entries):
        if keys is None:
            return True
        _reserve(cross_slot, cross_keys, cross_pairs, cross_max_entries, keys, pairs, spare, views, meta)
    return False


@njit(cache=CACHE)
def fold_needs_room(pending, n_min, n_max, max_entries, cross_slot, cross_max_entries, views, meta):
    """Whether ``fold_pending(pending, ...)`` could need a table to grow (then ``reserve_fold_room`` first).
    Counts the most records each token can add, so the room made may run ahead of what the fold uses."""
    return _fold_room(pending, n_min, n_max, max_entries, cross_slot, cross_max_entries, None, None, None, views,
                      meta)


@njit(cache=CACHE, nogil=True)
def reserve_fold_room(pending, n_min, n_max, max_entries, cross_slot, cross_max_entries, keys, pairs, spare, views,
                      meta):
    """Grow the tables ``fold_pending(pending, ...)`` will write to, so that it allocates nothing. Releases the
    GIL: the background fold thread runs it before the fold when a table must grow (nothing else may use the
    tables or the lists meanwhile)."""
    _fold_room(pending, n_min, n_max, max_entries, cross_slot, cross_max_entries, keys, pairs, spare, views, meta)
