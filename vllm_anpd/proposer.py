"""``AnpdProposer``: the vLLM-shaped proposer. Request lifecycle and buffers here; drafting in ``core``.

vLLM builds it through the ``custom_class`` route (``"method": "anpd"`` is routed there by the plugin, or
``{"method": "custom_class", "model": "vllm_anpd.AnpdProposer"}`` without the plugin) and calls
``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)`` once per engine step.

Lifecycle, keyed by request id (rows move every step):
* first step of a request: a slot is acquired and built from the prompt (inside the same kernel call);
* every step: a draft is made that counts the tokens appended since the last step; the request's tables and
  the cross-request table learn them afterwards, on a background thread, while the target model runs;
* partial prefill (empty ``sampled_token_ids[i]``): nothing is drafted and nothing is consumed;
* preemption: the request leaves the batch but stays in the runner's ``requests``; its slot is kept;
* finished or aborted: its id leaves the runner's ``requests`` (vLLM's ``_update_states``, at the next engine
  step); its slot is released then. So ANPD's state lives exactly as long as vLLM's own per-request state.

A failure inside ``propose`` never reaches the engine: that step goes without drafts (plain decoding, the same
outputs), the error is logged with its traceback, and the drafter restarts from the requests' contexts (as
``reset()``). After ``MAX_FAILURES`` failures it stops drafting for the rest of the engine's life.
"""

from __future__ import annotations

import logging
import operator
import os
import time

import numpy as np

from . import _vllm_compat
from .core import BatchBudget, NgramTables
from .core.budget import StepCostModel
from .core.tables import fold_thread_can_overlap

# A child of vLLM's logger: vLLM configures the handler and format, in every process.
logger = logging.getLogger("vllm.anpd")
LOG_STATS_ENV = "VLLM_ANPD_LOG_STATS"  # "0" silences the periodic statistics line
# Failures of propose() the drafter recovers from before it stops drafting for good: one is a rare fault
# (memory, a bug on one input), and the engine keeps its speed-up; repeated ones mean drafting is broken here.
MAX_FAILURES = 3


class AnpdProposer:
    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.params = _vllm_compat.params_from_speculative_config(spec)
        self.k = self.params.num_speculative_tokens
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        max_num_seqs = int(vllm_config.scheduler_config.max_num_seqs)
        self._max_num_seqs = max_num_seqs
        self._slots = np.full(max_num_seqs, -1, np.int32)
        self._slots_of_batch: dict = {}  # batch size -> self._slots[:batch], made once (a slice costs ~10 us cold)
        self._max_draft = np.full(max_num_seqs, self.k, np.int32)  # the model length is the kernel's to apply
        self._slot_of: dict[str, int] = {}
        self._owner: dict[str, object] = {}  # request id -> the runner's state object it was built for
        self._runner = _vllm_compat.find_constructing_runner()
        if self._runner is None:
            logger.warning("AnpdProposer built outside a vLLM model runner: requests are tracked by batch "
                           "row, which keeps outputs exact but weakens drafts when rows move.")
        # The tables learn each step's tokens on a background thread, while the target model verifies, unless
        # that thread could only share this thread's one CPU (vLLM's CPU worker binds it to one core): then in
        # the step.
        self.fold_in_background = fold_thread_can_overlap()
        if not self.fold_in_background:
            logger.info("ANPD: this worker thread is bound to one CPU; the n-gram tables learn each step's "
                        "tokens inside propose instead of on a background thread (which would share that CPU).")
        self._log_interval = _vllm_compat.stats_log_interval()
        self._log_enabled = os.environ.get(LOG_STATS_ENV, "1") != "0"
        self._next_log = time.monotonic() + self._log_interval
        self.failures = 0  # propose() calls that failed; not cleared by reset()
        self.drafting_disabled = False  # set at MAX_FAILURES: propose() then drafts nothing
        self.reset()  # builds the tables and the budget, and warms the kernel up

    def _warm_up(self, max_num_seqs: int) -> None:
        """Compile (or load from numba's disk cache) the kernel with vLLM's dtypes before serving."""
        tokens = np.zeros((max_num_seqs, 8), np.int32)
        tokens[0, :6] = [1, 2, 3, 1, 2, 3]
        slot = self.tables.acquire()
        self._slots[:] = -1
        self._slots[0] = slot
        self._max_draft[:] = 0
        self._max_draft[0] = 1
        self.tables.step(tokens, np.full(max_num_seqs, 6, np.int32), self._slots, self._max_draft)
        self._max_draft[:] = self.k
        self.tables.release(slot)
        self.tables.draft_lengths[:] = 0
        self.tables.released_meta[:] = 0
        self.tables.released_level_stats[:] = 0
        self.tables.cell_stats[:] = 0
        self.tables.accepted_total[:] = 0
        self.budget = BatchBudget(self.params)

    def reset(self) -> None:
        """Forget everything earlier requests taught: the cross-request table, the batch budget's averages and
        the statistics, as in a freshly started engine (benchmark phases, tenant isolation). Meant for when
        the engine has no unfinished request; a request still in flight stays exact: at its next step it gets
        a new slot, rebuilt from its whole context."""
        self._slot_of.clear()
        self._owner.clear()
        self.tables = NgramTables(self.params, num_slots=self._max_num_seqs, max_batch=self._max_num_seqs,
                                  fold_in_background=self.fold_in_background)
        self._warm_up(self._max_num_seqs)
        self._logged_drafts = 0
        # Step timing for the measured verify cost (see core/budget.py). The hardware does not change with a
        # reset, but the fit restarts with it, so a reset engine behaves like a fresh one.
        self.step_cost = StepCostModel(self.params.verify_cost)
        # The last propose's rows: request ids (a copy: vLLM updates its list in place), draft lengths and the rows
        # with nothing sampled. Each decoding row adds 1 + its draft to the engine step that follows. That
        # step's size is summed at the next propose over the requests still there: one that finished (or was
        # preempted) at the last step got a draft, but the step did not run it.
        self._last_ids: list = []
        self._last_lengths: list = []
        self._last_skipped: list = []
        # Whether self._slots still holds the slots of _last_ids' rows (no slot released or buffer replaced since).
        self._last_slots_valid = False
        self._step_started_at = 0.0

    def load_model(self, *args, **kwargs) -> None:
        """No model: the CPU runner calls this unconditionally."""

    @property
    def draft_length_histogram(self) -> np.ndarray:
        """Drafts proposed per length (index = length, 0 included), for the adaptive-length distribution."""
        return self.tables.draft_lengths

    @property
    def num_active_requests(self) -> int:
        return len(self._slot_of)

    def stats(self) -> dict:
        """ANPD's statistics: the tables' totals plus the lifecycle and adaptive-length figures."""
        if not self.drafting_disabled:  # once off, the proposer stops acting on requests: only reads here
            self._release_finished()
        st = self.tables.stats()
        st["tracked_requests"] = self.num_active_requests
        # Requests vLLM's model runner still holds. Its _update_states drops finished requests at the next
        # engine step, so after the last request of a burst finishes both figures lag by that step, equally.
        live = _vllm_compat.live_requests(self._runner) if self._runner is not None else None
        st["runner_requests"] = None if live is None else len(live)
        st["draft_length_histogram"] = self.draft_length_histogram.tolist()
        st["stop_probability"] = self.budget.last_stop_probability
        st["step_cost"] = self.step_cost.as_dict()
        st["fold_in_background"] = self.fold_in_background
        st["failures"] = self.failures
        st["drafting_disabled"] = self.drafting_disabled
        return st

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **_unused):
        """One draft per row of the batch (a list of token ids, possibly empty), for vLLM to verify."""
        if not self.drafting_disabled:
            try:
                return self._propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
            except Exception:
                self._recover()
        return [[] for _ in range(len(sampled_token_ids))]

    def _recover(self) -> None:
        """After a failure in ``_propose``: log it and restart the drafter; the step gets no drafts.

        Drafts only speed decoding up: vLLM verifies every draft token on the target model, and a step without
        drafts is plain decoding. So an error in the drafter (a bug, memory) costs speed, never outputs, and
        it must not take the engine and every request in flight down with it. The tables may be half
        updated, so they are rebuilt (``reset()``): each request in flight gets a new slot at its next step,
        built from its whole context. The statistics restart with them; ``failures`` does not."""
        self.failures += 1
        if self.failures >= MAX_FAILURES:
            self.drafting_disabled = True
            logger.exception("ANPD: drafting failed (failure %d of %d); speculative decoding proposes nothing "
                             "more in this engine: outputs are unchanged, without ANPD's speed-up. Please "
                             "report this traceback.", self.failures, MAX_FAILURES)
            return
        logger.exception("ANPD: drafting failed (failure %d; at %d, drafting stops for this engine). This step "
                         "goes without drafts (outputs unchanged); the drafter restarts from the requests' "
                         "contexts.", self.failures, MAX_FAILURES)
        try:
            self.reset()
        except Exception:
            self.drafting_disabled = True
            logger.exception("ANPD: the drafter could not restart; speculative decoding proposes nothing more "
                             "in this engine (outputs unchanged).")

    def _propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu):
        # Per-row work here is done in C-level passes (map, zip, numpy): with warm caches a Python loop over the
        # rows cost about 1 us per row, more than the kernel at batch 64-256. (Right after a forward pass, the
        # cache misses on each request's objects cost more than the loop: BENCHMARKS.md section 2.)
        called_at = time.perf_counter()
        self.tables.settle()  # the last step's background fold: done long ago, unless the step was empty
        self._release_finished()
        batch = len(sampled_token_ids)
        if batch == 0:
            self._last_ids, self._last_lengths, self._last_skipped = [], [], []
            return []
        if batch > self._slots.shape[0]:
            self._slots = np.full(batch, -1, np.int32)
            self._slots_of_batch = {}
            self._max_draft = np.full(batch, self.k, np.int32)
            self._last_slots_valid = False
        req_ids = self._request_ids(batch)
        slots = self._slots_of_batch.get(batch)
        if slots is None:
            slots = self._slots_of_batch[batch] = self._slots[:batch]
        # The step reads the first len(slots) entries of these two, as it reads the first rows of token_ids_cpu.
        max_draft = self._max_draft
        num_tokens = np.asarray(num_tokens_no_spec)
        # Rows with nothing sampled (a partial prefill, or a discarded sample): nothing new, no draft, and no
        # slot for a request seen for the first time.
        skipped = [] if all(sampled_token_ids) else [i for i, n in enumerate(map(len, sampled_token_ids)) if n == 0]
        # Steady decoding, the common step: the same requests in the same rows as at the last propose, every
        # row sampled then and now. Their slots are already in place, and the step that ran had 1 + draft
        # tokens per row. (Right after a forward pass, the per-row passes this skips cost ~50 us at batch 64.)
        same_rows = (not skipped and not self._last_skipped and self._last_slots_valid and req_ids == self._last_ids)
        if not same_rows:
            row_slots = list(map(self._slot_of.get, req_ids))
            for i in skipped:
                row_slots[i] = -1
            if None in row_slots:  # requests seen for the first time
                for i, slot in enumerate(row_slots):
                    if slot is None:
                        row_slots[i] = self._slot_for(req_ids[i])
            slots[:] = row_slots
        # The step that just ran was a pure decode step (its token count known) unless it prefilled: a partial
        # prefill, or a request that was not decoding at the previous step (new, or resumed after preemption,
        # which recomputes its context).
        if self.params.measure_verify_cost and not skipped:
            if same_rows:
                step_tokens = batch + sum(self._last_lengths)
            else:
                previous = dict(zip(self._last_ids, [1 + n for n in self._last_lengths]))
                for i in self._last_skipped:
                    del previous[self._last_ids[i]]
                row_tokens = list(map(previous.get, req_ids))
                step_tokens = None if None in row_tokens else sum(row_tokens)
            if step_tokens is not None:
                self.step_cost.observe(called_at - self._step_started_at, step_tokens)
        stop_probability = self.budget.stop_probability(batch - len(skipped), self.tables,
                                                        self.step_cost.verify_cost)
        # vLLM crashes on drafts longer than k (max_draft), and a draft may not cross max_model_len.
        drafts, lens = self.tables.step(token_ids_cpu, num_tokens, slots, max_draft, stop_probability,
                                        self.max_model_len - 1)
        lengths = lens.tolist()
        self.budget.drafted(sum(lengths))
        self._last_ids, self._last_lengths, self._last_skipped = list(req_ids), lengths, skipped
        self._last_slots_valid = True
        self._step_started_at = time.perf_counter()
        if self._log_enabled and time.monotonic() >= self._next_log:
            self._log_stats()
        return [row[:n] for row, n in zip(drafts.tolist(), lengths)]

    def _log_stats(self) -> None:
        """One INFO line at vLLM's stat-logging interval (VLLM_LOG_STATS_INTERVAL), when there was activity."""
        self._next_log = time.monotonic() + self._log_interval
        st = self.stats()
        if st["drafts"] == self._logged_drafts:
            return
        self._logged_drafts = st["drafts"]
        levels = ", ".join(f"{k} {v['accepted']}/{v['drafted']}" for k, v in st["per_level"].items() if v["drafted"])
        logger.info("ANPD: %d requests, %.1f MB of tables; %d drafts, mean length %.2f, acceptance %.2f; "
                    "accepted/drafted per level: %s; gate stops %d, probability stops %d; "
                    "stop probability %.2f; verify cost %.3f (%s)",
                    st["tracked_requests"], st["bytes_in_use"] / 2**20, st["drafts"],
                    st["drafted_tokens"] / max(st["drafts"], 1),
                    st["accepted_tokens"] / max(st["drafted_tokens"], 1), levels or "-", st["gate_stops"],
                    st["probability_stops"], st["stop_probability"], st["step_cost"]["verify_cost"],
                    "measured" if st["step_cost"]["measured"] else "configured")

    # --- request lifecycle ---------------------------------------------------------------------------
    def _request_ids(self, batch: int) -> list:
        ids = _vllm_compat.batch_request_ids(self._runner) if self._runner is not None else None
        if ids is None or len(ids) < batch:
            return [("row", i) for i in range(batch)]
        return ids if len(ids) == batch else ids[:batch]

    def _slot_for(self, req_id) -> int:
        slot = self._slot_of.get(req_id)
        if slot is None:
            slot = self.tables.acquire()
            self._slot_of[req_id] = slot
            self._owner[req_id] = self._live_state(req_id)
        return slot

    def _live_state(self, req_id):
        live = _vllm_compat.live_requests(self._runner) if self._runner is not None else None
        return None if live is None else live.get(req_id)

    def _release_finished(self) -> None:
        """Release requests that left the runner, or whose id now names a new request (abort + resubmit)."""
        if self._runner is None:
            return
        live = _vllm_compat.live_requests(self._runner)
        if live is None:
            return
        owners = self._owner
        if all(map(operator.is_, map(live.get, owners), owners.values())):  # the common case, in C-level passes
            return
        gone = [rid for rid, owner in owners.items() if live.get(rid) is not owner]
        for rid in gone:
            self.release(rid)

    def release(self, req_id) -> None:
        slot = self._slot_of.pop(req_id, None)
        self._owner.pop(req_id, None)
        if slot is not None:
            self.tables.release(slot)
            self._last_slots_valid = False  # the slot may go to another request: rows are looked up again
