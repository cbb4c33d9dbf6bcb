"""``NgramTables``: the per-request n-gram state of a whole batch, and its one-call-per-step API.

A request owns a *slot* from ``acquire()`` until ``release()``; the caller maps its own request ids to
slots (the vLLM glue does it by request id, never by batch row). Everything that happens per token runs
in the kernels (``step_batch`` on every step, ``prepare_rows`` on a step that must allocate, ``fold_pending``
after it, ``reserve_fold_room`` before it when a table must grow); Python here runs per step and per request
lifecycle event only.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref

import numpy as np
from numba.typed import List

from . import kernels as K
from .config import AnpdParams

_INITIAL_CAPACITY = 16
_NO_LENGTH_LIMIT = np.iinfo(np.int64).max // 2
_INT32 = np.dtype(np.int32)  # the one native int32 dtype numpy gives int32 arrays (another byte order is another)

# A step's fold goes to the background thread only from this many rows on. Handing it over wakes the thread
# (a futex wake; on a VM also an interrupt to another virtual CPU) on the step's path: ~8-9 us per step on
# the AMD EPYC VM of BENCHMARKS.md, more than folding one or two rows takes. Measured there (alternating
# A/B, section 2, "Small folds in the step"): a batch-1 step 11-12 -> 7-8 us, batch 2 12-13 -> 9-11 us with
# warm caches, no change with the caches evicted. At 4 rows and more, folding in the step cost as much as the
# hand-over or more (4 rows with the caches evicted: ~10 us more), so 3 rows, between the two, go to the thread.
# Inside a vLLM engine the hand-over costs more (the thread needs the GIL to start the fold, and the main thread
# waits for it; BENCHMARKS.md section 2, "Inside the engine"; measured when the fold still took typed lists).
# Those measurements were on vLLM CPU, whose worker is bound to one core, where the proposer now folds in the
# step at every batch (``fold_thread_can_overlap``).
BACKGROUND_FOLD_MIN_ROWS = 3


def fold_thread_can_overlap() -> bool:
    """Whether a fold thread started from the calling thread can run while the calling thread computes.

    A new thread inherits its creator's CPU affinity. vLLM's CPU worker binds its main thread to one core
    (OpenMP binding: ``OMP_PROC_BIND``, ``VLLM_CPU_OMP_THREADS_BIND``), so there a fold thread could only take
    turns with the forward pass on that core, paying thread switches and a GIL hand-over on top of the same
    work (BENCHMARKS.md section 2, "The fold thread on vLLM CPU"). False when the calling thread may run on
    one CPU only; True where it may run on several, or where the platform does not say (GPU workers are not
    bound)."""
    try:
        return len(os.sched_getaffinity(0)) > 1
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return True


def _allocation_of(table: np.ndarray) -> int:
    """Which allocation a table is a view of: the address numba's memory record for it holds (the same for
    every view of one allocation, as two tables sharing a huge page are); else the table's own address."""
    base = table.base
    return getattr(base, "data", None) or table.ctypes.data


def _empty_key_table():
    return np.zeros((_INITIAL_CAPACITY, K.KEY_COLUMNS), np.int64)


def _empty_pair_table():
    return np.zeros((_INITIAL_CAPACITY, K.PAIR_COLUMNS), np.int64)


def _empty_context():
    return np.zeros(_INITIAL_CAPACITY, np.int32)


def _no_spare_half_pages():
    """``new_records``'s ``spare`` with no half page waiting: one empty entry per table width (key tables,
    pair tables)."""
    return List([np.zeros((0, K.KEY_COLUMNS), np.int64), np.zeros((0, K.PAIR_COLUMNS), np.int64)])


def _grow_then_fold(num_pending: int, state: np.ndarray, room_args: tuple | None) -> None:
    """Grow the tables the fold will fill, if ``step_batch`` said one must grow (``room_args``: the arguments of
    ``reserve_fold_room``, the pending rows and the lists that own the tables among them), then fold the
    step's ``num_pending`` pending rows (arrays only, packed in ``state``: see ``NgramTables._bind_step_args``)."""
    if room_args is not None:
        K.reserve_fold_room(*room_args)
    K.fold_pending_bound(num_pending, state)


# Forks of this process so far (``os.fork``, multiprocessing's included), counted in the child. A fold thread
# does not survive a fork; comparing this count instead of calling os.getpid() keeps a system call off every
# step (~7 us right after a forward pass).
_forks_seen = 0


def _count_fork() -> None:
    global _forks_seen
    _forks_seen += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_count_fork)


class _FoldThread:
    """One daemon thread that runs the fold (a GIL-free kernel) after ``step`` has returned.

    In an engine the fold then overlaps the target model's forward pass instead of delaying it. At most one
    fold is in flight (``busy``); ``wait`` blocks until it is done (re-raising its error) and is called before
    anything reads or writes the tables again.
    """

    def __init__(self):
        self._start()

    def _start(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self.busy = False
        self._forks = _forks_seen
        self._thread = threading.Thread(target=self._run, name="anpd-fold", daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> None:
        if self.busy:
            self.wait()
        if self._forks != _forks_seen:  # forked: threads do not survive fork
            self._start()
        self.busy = True
        self._jobs.put((fn, args))

    def wait(self) -> None:
        if not self.busy:
            return
        self.busy = False
        if self._forks != _forks_seen:  # a fold in flight in the parent at fork time never runs here
            return
        error = self._done.get()
        if error is not None:
            raise error

    def stop(self) -> None:
        """End the thread (once the fold in flight, if any, is done)."""
        if self._forks == _forks_seen:
            self._jobs.put(None)

    def _run(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args = job
            try:
                fn(*args)
            except BaseException as e:  # handed to the caller's next wait()
                self._done.put(e)
            else:
                self._done.put(None)


class NgramTables:
    """Multi-level n-gram tables for up to ``num_slots`` concurrent requests (grows when more are live).

    ``step(token_ids, num_tokens, slots, max_draft)`` drafts up to ``max_draft[r]`` tokens per row and
    folds each row's new tokens into its slot; the returned arrays are views of preallocated buffers, valid
    until the next call.

    A step's new tokens are folded into the tables after its drafts (``kernels.fold_pending``; the drafts
    count them without the tables): right away inside ``step``, or with ``fold_in_background`` on a
    background thread that the next call to any method waits for. The two give identical drafts and
    tables; the background one takes the fold off the path between the target model's forward passes (the
    vLLM proposer uses it where the thread can run beside the step's: ``fold_thread_can_overlap``). Handing
    a fold to the thread costs a wake-up on the step's path, so a fold of fewer than
    ``background_fold_min_rows`` rows, which costs less than that, still runs inside ``step``.
    """

    def __init__(self, params: AnpdParams, num_slots: int = 16, max_batch: int = 256,
                 fold_in_background: bool = False, background_fold_min_rows: int = BACKGROUND_FOLD_MIN_ROWS):
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots!r}: must be >= 1")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r}: must be >= 1")
        if background_fold_min_rows < 1:
            raise ValueError(f"background_fold_min_rows={background_fold_min_rows!r}: must be >= 1")
        self.background_fold_min_rows = background_fold_min_rows
        self.params = params
        self._min_count = np.asarray(params.min_count, np.int32)
        self._min_share = np.asarray(params.min_share, np.float64)
        self.keys = List()  # per slot: int64[cap, 4] key records (see kernels.py)
        self.pairs = List()  # per slot: int64[cap, 2] (key, successor) records
        self.contexts = List()  # per slot: int32[cap], the request's tokens (the tables refer to positions)
        # Per table width (key tables, pair tables): half of a huge page that waits for the next 1 MiB table
        # of that kind, or an empty array (see kernels.new_records).
        self.spare_half_pages = _no_spare_half_pages()
        self.views = np.zeros((0, K.VIEW_COLUMNS), np.int64)  # per slot: where its three arrays are
        self.meta = np.zeros((0, K.META_COLUMNS), np.int64)
        self.calib = np.zeros((0, 2), np.float64)
        # Per slot and level: drafted, accepted. Levels 0..L-1 are the request's own tables, L..2L-1 the
        # cross-request table's.
        self.level_stats = np.zeros((0, 2 * params.num_levels, 2), np.int64)
        self.last_draft = np.zeros((0, params.num_speculative_tokens), np.int32)
        self.last_cell = np.zeros((0, params.num_speculative_tokens), np.int32)
        # Acceptance statistics per (level, count bucket, share bucket), shared by all requests: they
        # describe the model and the workload, not one request. Columns: reached, accepted.
        self.cell_stats = np.zeros((2 * params.num_levels * K.CELLS_PER_LEVEL, 2), np.int64)
        # Draft tokens accepted, all requests (released ones included): what the batch budget reads at every
        # step. One cell, so reading it costs no pass over the slots (a cold numpy sum over the slots' metadata
        # cost ~15 us per step in an engine).
        self.accepted_total = np.zeros(1, np.int64)
        # Drafts per length (index = length; 0 for a row that drafted nothing), one per row stepped with a slot.
        self.draft_lengths = np.zeros(params.num_speculative_tokens + 1, np.int64)
        # Statistics of released requests, so totals survive the slots.
        self.released_meta = np.zeros(K.META_COLUMNS, np.int64)
        self.released_level_stats = np.zeros((2 * params.num_levels, 2), np.int64)
        self._free: list[int] = []
        self._step_args = None  # see _bind_step_args
        self._step_arrays: dict = {}  # the arrays whose addresses _step_args holds
        self._grow_slots(num_slots + (1 if params.cross_request_entries else 0))
        self._min_count_cross = np.full(params.num_levels, params.cross_min_count, np.int32)
        # The cross-request table is a slot like the others, never released.
        self.cross_slot = self._free.pop() if params.cross_request_entries else -1
        self._out_drafts = np.zeros((max_batch, params.num_speculative_tokens), np.int32)
        self._out_lens = np.zeros(max_batch, np.int32)
        self._out_views: dict = {}  # batch size -> step's return value: views of the two arrays above
        self._pending = np.zeros((max_batch, 4), np.int64)  # what a step leaves to fold_pending
        self._acquired_since_step = False  # a new request's prompt needs prepare_rows
        self._fold_thread = None
        if fold_in_background:
            self._fold_thread = _FoldThread()
            weakref.finalize(self, self._fold_thread.stop)  # no thread outlives its tables
        # Compile (or load) the fold now, not at the first step.
        self._fold(0, background=False)

    def settle(self) -> None:
        """Wait for a background fold in flight (every method does, before touching the tables)."""
        fold_thread = self._fold_thread
        if fold_thread is not None and fold_thread.busy:
            fold_thread.wait()

    def _fold(self, num_pending: int, background: bool, needs_room: bool = True) -> None:
        """Fold the first ``num_pending`` rows of ``_pending`` (what the last ``step_batch`` left)."""
        state = self._step_args
        if state is None:
            state = self._bind_step_args()
        room_args = None
        if needs_room:  # rare: most steps' tokens fit the tables as they are
            p = self.params
            room_args = (self._pending[:num_pending], p.n_min, p.n_max, p.max_entries_per_request, self.cross_slot,
                         p.cross_request_entries, self.keys, self.pairs, self.spare_half_pages, self.views, self.meta)
        if background and self._fold_thread is not None:
            # Growing a table rehashes it (tens of us to ms): on the thread too, off the step's path.
            self._fold_thread.submit(_grow_then_fold, num_pending, state, room_args)
        else:
            _grow_then_fold(num_pending, state, room_args)

    # --- lifecycle ---------------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.meta.shape[0]

    @property
    def num_active(self) -> int:
        """Slots held by requests (the cross-request table's slot is not counted)."""
        return self.num_slots - len(self._free) - (self.cross_slot >= 0)

    def acquire(self) -> int:
        """A clean slot for a new request."""
        self.settle()
        if not self._free:
            self._grow_slots(self.num_slots * 2)
        self._acquired_since_step = True
        return self._free.pop()

    def release(self, slot: int) -> None:
        """Forget the request in ``slot``: its tables are erased and shrunk back, its stats kept in totals."""
        if not 0 <= slot < self.num_slots or slot in self._free or slot == self.cross_slot:
            raise ValueError(f"slot={slot!r}: not an acquired slot")
        self.settle()
        self.released_meta += self.meta[slot]
        self.released_level_stats += self.level_stats[slot]
        K.forget_spare_beside(self.keys[slot], self.spare_half_pages)
        K.forget_spare_beside(self.pairs[slot], self.spare_half_pages)
        self.keys[slot] = _empty_key_table()
        self.pairs[slot] = _empty_pair_table()
        self.contexts[slot] = _empty_context()
        K.refresh_views(slot, self.keys, self.pairs, self.contexts, self.views)
        K.reset_slot(slot, self.keys, self.pairs, self.meta, self.calib, self.level_stats, self.last_draft,
                     self.last_cell)
        self._free.append(slot)

    def _grow_slots(self, new_count: int) -> None:
        old = self.num_slots
        extra = new_count - old
        for _ in range(extra):
            self.keys.append(_empty_key_table())
            self.pairs.append(_empty_pair_table())
            self.contexts.append(_empty_context())

        def grow(a):
            return np.concatenate([a, np.zeros((extra,) + a.shape[1:], a.dtype)])

        self.meta = grow(self.meta)
        self.calib = grow(self.calib)
        self.level_stats = grow(self.level_stats)
        self.last_draft = grow(self.last_draft)
        self.last_cell = grow(self.last_cell)
        self.views = grow(self.views)
        for slot in range(old, new_count):
            K.refresh_views(slot, self.keys, self.pairs, self.contexts, self.views)
        self._step_args = None  # the arrays above were replaced
        # Lowest slots first: pop() takes from the end.
        self._free.extend(range(new_count - 1, old - 1, -1))

    # --- the step --------------------------------------------------------------------------------
    def step(self, token_ids: np.ndarray, num_tokens: np.ndarray, slots: np.ndarray, max_draft: np.ndarray,
             stop_probability: float | None = None, max_len: int = _NO_LENGTH_LIMIT):
        """Update and draft for a batch. Returns ``(drafts[B, k], lengths[B])`` (views, reused next call).

        ``token_ids``: int32 ``[B', L]`` with ``B' >= B``: row ``r`` holds request ``slots[r]``'s context.
        ``slots``: int32 per row (``-1`` skips the row); its length is the batch size ``B``.
        ``num_tokens``: context length per row; ``max_draft``: per-row draft limit (both: the first ``B``
        entries are read, as vLLM's buffers hold more). ``max_len``: no row's context plus draft goes past it
        (for vLLM, ``max_model_len - 1``: the token after the draft must fit too).
        """
        fold_thread = self._fold_thread
        if fold_thread is not None and fold_thread.busy:  # settle(), inline: a call costs ~5 us after a forward pass
            fold_thread.wait()
        batch = slots.shape[0]
        if batch > self._out_lens.shape[0]:
            self._out_drafts = np.zeros((batch, self.params.num_speculative_tokens), np.int32)
            self._out_lens = np.zeros(batch, np.int32)
            self._out_views = {}
            self._pending = np.zeros((batch, 4), np.int64)
            self._step_args = None
        if token_ids.dtype is not _INT32:  # not `!= np.int32`, which converts the type first: ~10 us when cold
            token_ids = self._as_int32_tokens(token_ids)
        if stop_probability is None:
            stop_probability = self.params.stop_probability
        # Most steps need no allocation: step_batch takes arrays only (cheap to dispatch). A step with a new
        # request (its prompt), or any row that step_batch finds needs one, goes through prepare_rows first.
        num_pending = -1
        state = self._step_args
        if state is None:
            state = self._bind_step_args()
        if not self._acquired_since_step:
            num_pending, needs_room = K.step_batch_bound(token_ids, num_tokens, slots, max_draft, max_len,
                                                         stop_probability, 0, state)
        if num_pending < 0:
            p = self.params
            num_prepared, _ = K.prepare_rows(
                token_ids, num_tokens, slots, p.n_min, p.n_max, p.max_entries_per_request, self.cross_slot,
                self.keys, self.pairs, self.spare_half_pages, self.contexts, self.views, self.meta, self.calib,
                self.level_stats, self.cell_stats, self.accepted_total, self.last_draft, self.last_cell, self._pending,
                0)
            self._acquired_since_step = False
            num_pending, needs_room = K.step_batch_bound(token_ids, num_tokens, slots, max_draft, max_len,
                                                         stop_probability, num_prepared, state)
            if num_pending < 0:
                raise RuntimeError("ANPD: a row still needs an allocation after prepare_rows (a bug)")
        if num_pending:
            self._fold(num_pending, background=num_pending >= self.background_fold_min_rows, needs_room=needs_room)
        # The same two views for the same batch size, made once: right after a forward pass, two slices cost ~15 us.
        out = self._out_views.get(batch)
        if out is None:
            out = self._out_views[batch] = (self._out_drafts[:batch], self._out_lens[:batch])
        return out

    def _bind_step_args(self) -> np.ndarray:
        """``step_batch``'s own arguments, packed for ``step_batch_bound`` (``kernels.bound_state``: their
        addresses and shapes in one int64 array), until an array is replaced (more slots, a larger batch: both
        set ``_step_args`` to None). A step then dispatches 8 arguments instead of 28, and reads one attribute
        instead of twenty; right after a forward pass each of those costs about a microsecond."""
        p = self.params
        # The fold's limits travel with the step: step_batch reports whether the fold needs a table grown first.
        scalars = dict(n_min=p.n_min, n_max=p.n_max, cross_slot=self.cross_slot,
                       max_entries=p.max_entries_per_request, cross_max_entries=p.cross_request_entries)
        # Kept with the packed addresses, so that no array they point to is freed while they are in use.
        self._step_arrays = dict(
            min_count=self._min_count, min_share=self._min_share, cross_min_count=self._min_count_cross,
            views=self.views, meta=self.meta, calib=self.calib, level_stats=self.level_stats,
            cell_stats=self.cell_stats, accepted_total=self.accepted_total, last_draft=self.last_draft,
            last_cell=self.last_cell, out_drafts=self._out_drafts, out_lens=self._out_lens,
            draft_lengths=self.draft_lengths, pending=self._pending)
        self._step_args = K.bound_state(scalars, self._step_arrays)
        return self._step_args

    @staticmethod
    def _as_int32_tokens(token_ids: np.ndarray) -> np.ndarray:
        if token_ids.size and (token_ids.min() < np.iinfo(np.int32).min or token_ids.max() > np.iinfo(np.int32).max):
            bad = token_ids.max() if token_ids.max() > np.iinfo(np.int32).max else token_ids.min()
            raise ValueError(f"token id {int(bad)} does not fit in int32")
        return np.ascontiguousarray(token_ids, dtype=np.int32)

    # --- introspection -----------------------------------------------------------------------------
    def bytes_in_use(self) -> int:
        """Bytes held by all tables and per-slot arrays (live and free slots). Tables in huge pages count
        their pages, once each: two 1 MiB tables may share a page, and a page whose one table is gone is
        still held by the other (or by the spare half)."""
        self.settle()
        total = 0
        pages = {}
        for table in (*self.keys, *self.pairs, *self.spare_half_pages):
            if table.nbytes < K.HUGE_PAGE_MIN_TABLE_BYTES:
                total += table.nbytes
            else:
                pages[_allocation_of(table)] = K.held_bytes(table.nbytes)
        total += sum(pages.values())
        total += sum(a.nbytes for a in self.contexts)  # plain arrays (not new_records)
        total += sum(a.nbytes for a in (self.meta, self.views, self.calib, self.level_stats, self.last_draft,
                                         self.last_cell, self.cell_stats, self.accepted_total,
                                         self.draft_lengths, self._out_drafts, self._out_lens, self._pending))
        return int(total)

    def slot_bytes(self, slot: int) -> int:
        """The bytes of ``slot``'s own arrays (a huge page it shares, or holds alone, counts in
        ``bytes_in_use``)."""
        self.settle()
        return int(self.keys[slot].nbytes + self.pairs[slot].nbytes + self.contexts[slot].nbytes)

    def stats(self) -> dict:
        """Totals over live and released requests: drafts, tokens, acceptance, per-level figures."""
        self.settle()
        free = set(self._free) | {self.cross_slot}
        live = [s for s in range(self.num_slots) if s not in free]
        meta = self.released_meta + self.meta[live].sum(axis=0)
        levels = self.released_level_stats + self.level_stats[live].sum(axis=0)
        p = self.params
        per_level = {}
        for i in range(2 * p.num_levels):
            name = f"n={p.n_min + i % p.num_levels}" + (" (cross-request)" if i >= p.num_levels else "")
            if i < p.num_levels or self.cross_slot >= 0:
                per_level[name] = {"drafted": int(levels[i, 0]), "accepted": int(levels[i, 1])}
        out = {
            "drafts": int(meta[K.META_DRAFTS]),
            "drafted_tokens": int(meta[K.META_DRAFTED]),
            "accepted_tokens": int(meta[K.META_ACCEPTED]),
            "gate_stops": int(meta[K.META_GATE_STOPS]),
            "probability_stops": int(meta[K.META_PROB_STOPS]),
            "dropped_ngrams": int(meta[K.META_DROPPED]),
            "per_level": per_level,
            "active_requests": self.num_active,
            "bytes_in_use": self.bytes_in_use(),
        }
        if self.cross_slot >= 0:
            g = self.cross_slot
            out["cross_request"] = {"entries": int(self.meta[g, K.META_KEYS]),
                                    "clears": int(self.meta[g, K.META_CLEARS]), "bytes": self.slot_bytes(g)}
        return out
