"""The replay simulator (``benchmarks/replay.py``) and the headroom oracles (``benchmarks/headroom.py``): their
verification semantics on synthetic references, in seconds (no engine, no cached references).

Every MAT and modelled speedup in BENCHMARKS.md sections 1 and 3 comes out of ``replay.replay``; these tests pin
what it counts: one token per prefill, the longest matching draft prefix plus one token per step, never past the
reference's end, and a modelled time equal to the baseline's when nothing is drafted."""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import headroom  # noqa: E402
from replay import AnpdDrafter, Corpus, VllmNgramDrafter, replay  # noqa: E402

from vllm_anpd.core import AnpdParams  # noqa: E402

COST = (0.065, 0.0045)  # seconds per step + per scored token, as calibrated here


def synthetic_corpus(seed: int, n: int = 12, vocab: int = 5) -> Corpus:
    """Random prompts and outputs over a tiny vocabulary (so that n-grams repeat and drafts happen)."""
    rng = np.random.default_rng(seed)
    refs = []
    for i in range(n):
        prompt = rng.integers(1, vocab + 1, int(rng.integers(1, 40))).tolist()
        output = rng.integers(1, vocab + 1, int(rng.integers(1, 60))).tolist()  # some of one token
        refs.append({"prompt_ids": prompt, "output_ids": output, "category": f"c{i % 3}"})
    return Corpus(refs)


class ReferenceDrafter:
    """Drafts the reference continuation itself, up to k tokens and up to the reference's end."""

    def __init__(self, corpus):
        self.corpus = corpus

    def propose(self, tokens, num_tokens, active, k):
        drafts = np.zeros((len(active), k), np.int32)
        lens = np.zeros(len(active), np.int32)
        for i in np.flatnonzero(active):
            n = int(num_tokens[i])
            length = min(k, int(self.corpus.prompt_len[i] + self.corpus.out_len[i]) - n)
            drafts[i, :length] = tokens[i, n:n + length]
            lens[i] = length
        return drafts, lens


class NoDrafter:
    def propose(self, tokens, num_tokens, active, k):
        return np.zeros((len(active), k), np.int32), np.zeros(len(active), np.int32)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_perfect_drafts_give_k_plus_one_tokens_per_step(k):
    corpus = synthetic_corpus(seed=k)
    res = replay(corpus, ReferenceDrafter(corpus), k, batch=4)
    assert np.array_equal(res["produced"], corpus.out_len)
    # Prefill yields one token; each later step k accepted + the target's own, the last one whatever is left.
    expected_steps = [1 + math.ceil((n - 1) / (k + 1)) for n in corpus.out_len]
    assert res["steps"].tolist() == expected_steps
    # The reference's last token is always the target's own, never an accepted draft token.
    assert np.array_equal(res["accepted"], corpus.out_len - res["steps"])


@pytest.mark.parametrize("batch", [1, 4, 0])
def test_no_drafts_is_one_token_per_step_and_modelled_like_the_baseline(batch):
    corpus = synthetic_corpus(seed=7, n=15)
    res = replay(corpus, NoDrafter(), 5, batch=batch, cost=COST)
    assert np.array_equal(res["produced"], corpus.out_len)
    assert np.array_equal(res["steps"], corpus.out_len)
    assert res["drafted"].sum() == res["accepted"].sum() == 0
    assert res["modelled_time"] == pytest.approx(res["modelled_baseline"])


@pytest.mark.parametrize("batch", [1, 3])
def test_requests_that_finish_at_prefill_do_not_shrink_the_batch(batch):
    """One-token outputs end at their prefill; the next waiting request must take their place, as in the
    baseline's continuous batching (otherwise the modelled speedup compares different batch sizes)."""
    corpus = synthetic_corpus(seed=3, n=10)
    corpus.out_len[[0, 1, 4]] = 1
    res = replay(corpus, NoDrafter(), 5, batch=batch, cost=COST)
    assert np.array_equal(res["produced"], corpus.out_len)
    assert res["modelled_time"] == pytest.approx(res["modelled_baseline"])


@pytest.mark.parametrize("chooser", ["highest", "oracle-tops"])
def test_a_perfect_stop_keeps_the_choosers_mat_and_rejects_nothing(chooser):
    corpus = synthetic_corpus(seed=11, vocab=3)
    plain = replay(corpus, headroom.ChooserDrafter(chooser, corpus), 6, batch=1)
    stopped = replay(corpus, headroom.ChooserDrafter(chooser + "+oracle-stop", corpus), 6, batch=1)
    assert plain["drafted"].sum() > plain["accepted"].sum() > 0  # the plain chooser does draft wrong tokens
    assert np.array_equal(stopped["steps"], plain["steps"])
    assert np.array_equal(stopped["accepted"], plain["accepted"])
    # Only a request's last token can be drafted and not accepted (it is the target's own, see above).
    rejected = stopped["drafted"] - stopped["accepted"]
    assert np.all((rejected >= 0) & (rejected <= 1))


def test_oracle_tops_accepts_at_least_what_highest_does_at_each_first_step():
    """On the first decode step of each request both choosers see the same tables, and the oracle takes the
    true token whenever any level's top is it, so its accepted prefix is never shorter there."""
    corpus = synthetic_corpus(seed=5, vocab=3)
    counts = {}
    for chooser in ("highest", "oracle-tops"):
        drafter = headroom.ChooserDrafter(chooser, corpus)
        n = corpus.prompt_len + 1  # after the prefill's token
        active = corpus.out_len > 1
        drafts, lens = drafter.propose(corpus.tokens, n, active, 6)
        counts[chooser] = [int(np.argmin(np.append(drafts[i, :lens[i]] == corpus.tokens[i, n[i]:n[i] + lens[i]],
                                                   False))) for i in np.flatnonzero(active)]
    assert sum(counts["highest"]) > 0  # not vacuous: the plain rule's drafts are partly right
    assert all(o >= h for o, h in zip(counts["oracle-tops"], counts["highest"]))


def test_anpd_and_vllm_ngram_in_the_replay_within_limits_and_paying_where_outputs_copy():
    rng = np.random.default_rng(2)
    refs = []
    for i in range(8):  # outputs that copy a span of their prompt, then go on at random
        prompt = rng.integers(1, 50, 40).tolist()
        refs.append({"prompt_ids": prompt, "output_ids": prompt[5:35] + rng.integers(1, 50, 10).tolist(),
                     "category": "copy"})
    corpus = Corpus(refs)
    k = 5
    for drafter in (AnpdDrafter(AnpdParams(num_speculative_tokens=k), len(refs)),
                    VllmNgramDrafter(2, 4, k, len(refs), corpus.tokens.shape[1] + k + 2)):
        res = replay(corpus, drafter, k, batch=4, cost=COST)
        assert np.array_equal(res["produced"], corpus.out_len)
        assert np.all(res["accepted"] <= res["drafted"])
        assert np.all(res["drafted"] <= k * (res["steps"] - 1))  # no draft at the prefill step
        assert res["produced"].sum() / res["steps"].sum() > 2.0  # the copied spans are drafted and accepted
        assert res["modelled_time"] < res["modelled_baseline"]


def test_step_cost_max_draft_caps_what_anpd_drafts_and_nothing_else(monkeypatch):
    """``--max-draft`` splits a step's cost between its update and its drafting: with 0 the tables still learn
    every step's tokens and nothing is drafted; with 3 no draft is longer than 3; out of [0, k] it is refused."""
    import step_cost

    from vllm_anpd.core import kernels

    context, batch, steps = 256, 2, 5
    tokens = step_cost.make_batch(context, batch, steps)
    for cap in (0, 3):
        runner = step_cost.AnpdRunner(tokens, context, batch, {}, False, cap)
        for s in range(1, steps + 1):
            runner.step(np.full(batch, context + 2 * s, np.int32))
        consumed = runner.tables.meta[runner.slots, kernels.META_CONSUMED]
        assert (consumed == context + 2 * steps).all(), (cap, consumed)
        lengths = runner.tables.draft_lengths
        if cap == 0:
            assert runner.tables.stats()["drafts"] == 0 and lengths[1:].sum() == 0
        else:
            assert lengths[1:cap + 1].sum() > 0 and lengths[cap + 1:].sum() == 0, lengths
    monkeypatch.setattr(sys, "argv", ["step_cost.py", "--max-draft", str(step_cost.K + 1)])
    with pytest.raises(SystemExit):
        step_cost.main()


def test_step_cost_results_name_their_machine_and_text(tmp_path, monkeypatch):
    """A proposer cost is a memory-latency figure: without the machine it was measured on it compares with
    nothing (vLLM ngram's 16k x 64 step differs 2x between two of this project's VMs)."""
    import json

    import step_cost

    monkeypatch.setattr(step_cost, "RESULTS", tmp_path)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # recorded only: read by glibc at start-up
    monkeypatch.setattr(sys, "argv", ["step_cost.py", "--contexts", "64", "--batches", "2", "--steps", "3",
                                      "--repeats", "1", "--skip-vllm", "--out", "tiny"])
    step_cost.main()
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    assert result["machine"]["commit"] != ""
    assert result["machine"]["glibc_tunables"] == "glibc.malloc.hugetlb=1"
    assert result["stream"].startswith("Spec-Bench prompts")
    assert result["rows"][0]["anpd_us"] > 0
    first_line = (tmp_path / "tiny.md").read_text().splitlines()[0]
    assert first_line.startswith("Measured on ") and result["machine"]["cpu"] in first_line
    assert result["stream"] in first_line
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in first_line  # malloc's huge pages move these costs


def test_cache_evictors_read_what_they_are_told_and_the_results_say_which(tmp_path, monkeypatch):
    """``--evict-mb``'s stand-in for the forward pass: by default a torch tensor summed on torch's threads (as
    vLLM CPU's forward pass, every core, torch's allocator), on request the numpy array of the figures before
    2026-11-29. Each reads every element of the MB it is given, 0 means steps back to back, an unknown kind is
    refused by name, and a result records which one ran."""
    import json

    import step_cost

    assert step_cost.cache_evictor(0) is None
    for kind in step_cost.EVICTORS:
        assert int(step_cost.cache_evictor(2, kind)()) == 2 << 17, kind  # a sum of ones: 2 MB of int64 read
    with pytest.raises(ValueError, match="evictor 'bogus'"):
        step_cost.cache_evictor(1, "bogus")
    monkeypatch.setattr(step_cost, "RESULTS", tmp_path)
    for extra, kind in (([], "torch"), (["--evict-with", "numpy"], "numpy")):
        monkeypatch.setattr(sys, "argv", ["step_cost.py", "--contexts", "64", "--batches", "2", "--steps", "2",
                                          "--repeats", "1", "--skip-vllm", "--evict-mb", "2", "--out", kind, *extra])
        step_cost.main()
        args = json.loads((tmp_path / f"{kind}.json").read_text())["args"]
        assert (args["evict_mb"], args["evict_with"]) == (2, kind)
        assert kind in step_cost.evicted_conditions(SimpleNamespace(**args))


def _core_ab_in(tmp_path, monkeypatch):
    """``core_ab`` writing its results and its copies of base cores under ``tmp_path``."""
    import core_ab

    monkeypatch.setattr(core_ab, "RESULTS", tmp_path)
    monkeypatch.setattr(core_ab, "cache_root", lambda: tmp_path / "cores")
    return core_ab


def test_core_ab_against_the_same_core_drafts_the_same_and_writes_its_files(tmp_path, monkeypatch):
    """The in-process A/B of the core: against a copy of this checkout's own core, both sides draft the same
    tokens at every step, and the results name the machine, the base and both sides' times."""
    import json

    import vllm_anpd.core

    core_ab = _core_ab_in(tmp_path, monkeypatch)
    core_dir = Path(vllm_anpd.core.__file__).parent
    rows = core_ab.main(["--base-dir", str(core_dir), "--contexts", "300", "--batches", "1", "3", "--steps", "6",
                         "--out", "tiny_ab"])
    assert [(r["batch"], r["same_drafts"]) for r in rows] == [(1, True), (3, True)]
    assert any(r["new_mean_draft"] > 0 for r in rows)  # steps that draft, not empty ones
    assert all(r["base_us"] > 0 and r["new_us"] > 0 and r["new_over_base"] > 0 for r in rows)
    result = json.loads((tmp_path / "tiny_ab.json").read_text())
    assert result["base_package"].startswith("anpd_core_dir_") and result["machine"]["cpu"]
    assert (tmp_path / "cores" / result["base_package"] / result["base_package"] / "kernels.py").exists()
    assert (tmp_path / "tiny_ab.md").read_text().startswith("Measured on ")
    assert (tmp_path / "tiny_ab.png").stat().st_size > 0


def test_core_ab_tells_a_core_that_drafts_otherwise(tmp_path, monkeypatch):
    """A base core whose drafts differ (here: its default levels stop at n = 3 instead of 7) is reported so."""
    import shutil

    import vllm_anpd.core

    core_ab = _core_ab_in(tmp_path, monkeypatch)
    other = tmp_path / "other_core"
    shutil.copytree(Path(vllm_anpd.core.__file__).parent, other, ignore=shutil.ignore_patterns("__pycache__"))
    config = other / "config.py"
    text = config.read_text()
    assert "    n_max: int = 7\n" in text
    config.write_text(text.replace("    n_max: int = 7\n", "    n_max: int = 3\n"))
    rows = core_ab.main(["--base-dir", str(other), "--contexts", "600", "--batches", "4", "--steps", "12",
                         "--out", "other_ab"])
    assert rows[0]["same_drafts"] is False


def test_core_ab_takes_a_git_revision_and_names_a_bad_one(tmp_path, monkeypatch):
    core_ab = _core_ab_in(tmp_path, monkeypatch)
    package, path = core_ab.core_at_revision("HEAD")
    assert package.startswith("anpd_core_") and (path / package / "kernels.py").exists()
    assert not (path / package / "tables.py").read_text().count("from vllm_anpd")  # relative imports only
    with pytest.raises(SystemExit, match="no-such-revision"):
        core_ab.core_at_revision("no-such-revision")


def test_core_ab_fold_in_step_times_the_fold_inside_the_step(tmp_path, monkeypatch):
    """``--fold-in-step`` (all of a step's work, as vLLM CPU runs it): both sides fold inside the timed step, no
    fold thread, and the results say so; without it, both fold on their thread."""
    import vllm_anpd.core

    core_ab = _core_ab_in(tmp_path, monkeypatch)
    built = []

    class Recorded(core_ab.step_cost.AnpdRunner):
        def __init__(self, tokens, context, batch, overrides, background, *args, **kwargs):
            super().__init__(tokens, context, batch, overrides, background, *args, **kwargs)
            built.append((background, self.tables._fold_thread is None))

    monkeypatch.setattr(core_ab.step_cost, "AnpdRunner", Recorded)
    core_dir = str(Path(vllm_anpd.core.__file__).parent)
    common = ["--base-dir", core_dir, "--contexts", "300", "--batches", "2", "--steps", "4"]
    rows = core_ab.main(common + ["--fold-in-step", "--out", "all_work"])
    assert built == [(False, True), (False, True)] and rows[0]["same_drafts"]
    assert "the fold inside the step (all work)" in (tmp_path / "all_work.md").read_text()
    built.clear()
    core_ab.main(common + ["--out", "critical_path"])
    assert [background for background, _ in built] == [True, True]
    assert "the fold on its thread (untimed)" in (tmp_path / "critical_path.md").read_text()


def test_core_ab_keeps_the_diff_of_a_core_that_is_not_committed(tmp_path, monkeypatch):
    """An experiment measured from a working tree: the results keep what the core's uncommitted change was. And a
    revision without the core is refused by name."""
    import subprocess

    core_ab = _core_ab_in(tmp_path, monkeypatch)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("x\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "no core yet"]):
        subprocess.run(git + cmd, cwd=repo, check=True)
    with pytest.raises(SystemExit, match="no vllm_anpd/core"):
        core_ab.core_at_revision("HEAD", repo)
    assert not list((tmp_path / "cores").iterdir())  # nothing half made is left to be taken for a core
    (repo / "vllm_anpd" / "core").mkdir(parents=True)
    (repo / "vllm_anpd" / "core" / "kernels.py").write_text("WINDOW = 32\n")
    for cmd in (["add", "."], ["commit", "-q", "-m", "core"]):
        subprocess.run(git + cmd, cwd=repo, check=True)
    assert core_ab.uncommitted_core_diff(repo) == ""
    (repo / "README.md").write_text("y\n")  # not the core
    assert core_ab.uncommitted_core_diff(repo) == ""
    (repo / "vllm_anpd" / "core" / "kernels.py").write_text("WINDOW = 16\n")
    diff = core_ab.uncommitted_core_diff(repo)
    assert "-WINDOW = 32" in diff and "+WINDOW = 16" in diff


@pytest.fixture
def batch_ab_runs(monkeypatch, tmp_path):
    """``batch_ab`` with its engine runs faked: each worker process it would start is recorded by configuration
    name and returns a made-up result; results go to ``tmp_path``. Other commands (``machine.describe()``
    asks git; ``batch_ab.subprocess`` is the module itself) run for real."""
    import json
    import subprocess

    import batch_ab

    started = []
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):
        if "--worker" not in cmd:
            return real_run(cmd, **kwargs)
        name = cmd[cmd.index("--worker") + 1]
        started.append(name)
        result = {"name": name, "tok_s": 100.0, "mat": 1.0}
        return subprocess.CompletedProcess(cmd, 0, stdout="RESULT " + json.dumps(result) + "\n", stderr="")

    monkeypatch.setattr(batch_ab.subprocess, "run", fake_run)
    monkeypatch.setattr(batch_ab, "RESULTS", tmp_path)
    return batch_ab, started


@pytest.mark.parametrize("argv, named", [
    (["--batch", "64", "--per-category", "10"], "--prompts 48 is below --batch 64"),  # the default 48 prompts
    (["--batch", "8", "--per-category", "1", "--prompts", "14"], "--prompts 14: the set has 13"),
    (["--batch", "0", "--prompts", "8"], "--batch 0"),
    (["--temperature", "-0.5"], "--temperature -0.5"),
])
def test_batch_ab_refuses_a_prompt_set_that_cannot_give_its_batch(batch_ab_runs, monkeypatch, capsys, argv, named):
    """The closed loop never has more requests in flight than prompts: a batch-64 run on 48 prompts ran at
    most 48 at once. Refused before any engine starts, naming the values."""
    batch_ab, started = batch_ab_runs
    monkeypatch.setattr(sys, "argv", ["batch_ab.py", *argv, "--configs", "none"])
    with pytest.raises(SystemExit) as exit_:
        batch_ab.main()
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err
    assert started == []


def test_batch_ab_accepts_a_set_that_fills_its_batch(batch_ab_runs, monkeypatch):
    """The check passes the sets the documented commands use: 48 of the 65-prompt set at batch 32, all 130
    at batch 64."""
    batch_ab, started = batch_ab_runs
    for argv in (["--batch", "32"], ["--batch", "64", "--per-category", "10", "--prompts", "130"]):
        monkeypatch.setattr(sys, "argv", ["batch_ab.py", *argv, "--configs", "none", "--repeats", "1"])
        batch_ab.main()
    assert started == ["none", "none"]


def test_batch_ab_default_is_the_documented_comparison(batch_ab_runs, monkeypatch, tmp_path):
    """``python benchmarks/batch_ab.py`` alone runs none, none-sync, anpd-zero and anpd in two alternating
    rounds (8 engine runs, as README and BENCHMARKS.md say), not every configuration gathered since; the
    second round's order is the first's rotated by one, so that no configuration always runs last."""
    batch_ab, started = batch_ab_runs
    monkeypatch.setattr(sys, "argv", ["batch_ab.py"])
    batch_ab.main()
    assert started == ["none", "none-sync", "anpd-zero", "anpd", "none-sync", "anpd-zero", "anpd", "none"]
    assert len((tmp_path / "batch_ab.jsonl").read_text().splitlines()) == 8


def test_batch_ab_forwards_the_temperature_to_every_run(batch_ab_runs, monkeypatch):
    batch_ab, started = batch_ab_runs
    fake_run, commands = batch_ab.subprocess.run, []
    monkeypatch.setattr(batch_ab.subprocess, "run", lambda cmd, **kw: (commands.append(cmd), fake_run(cmd, **kw))[1])
    monkeypatch.setattr(sys, "argv", ["batch_ab.py", "--temperature", "0.7", "--configs", "none", "anpd",
                                      "--repeats", "1"])
    batch_ab.main()
    workers = [c for c in commands if "--worker" in c]
    assert [(c[c.index("--worker") + 1], c[c.index("--temperature") + 1]) for c in workers] == [
        ("none", "0.7"), ("anpd", "0.7")]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_sampled_references_have_their_own_file_and_the_replay_names_the_command(temperature, monkeypatch,
                                                                                  tmp_path):
    """Greedy and sampled references must never be mixed up: a replay of a missing set names the exact
    command that makes it."""
    import make_references
    import replay as replay_module

    monkeypatch.setattr(make_references.models, "cache_dir", lambda: tmp_path)
    path = make_references.reference_path(256, temperature)
    assert path == tmp_path / "references" / ("specbench_t256.jsonl" if not temperature
                                              else f"specbench_t256_temp{temperature:g}.jsonl")
    with pytest.raises(SystemExit, match="make_references.py --max-tokens 256"
                                         + (f" --temperature {temperature:g}" if temperature else "$")):
        replay_module.load_references(256, temperature)
    path.parent.mkdir(parents=True)
    path.write_text('{"prompt_ids": [1], "output_ids": [2]}\n')
    assert replay_module.load_references(256, temperature) == [{"prompt_ids": [1], "output_ids": [2]}]


@pytest.mark.parametrize("text", ["-0.1", "2.5", "nan"])
def test_sampling_benchmarks_refuse_a_temperature_out_of_range(text):
    import argparse

    import engine_bench

    with pytest.raises(argparse.ArgumentTypeError, match=f"--temperature {text}: must be in"):
        engine_bench.temperature_arg(text)



# Each script with an ``--anpd`` option, and the keys it takes: AnpdParams fields, or engine_bench's anpd_* ones.
ANPD_OPTION_SCRIPTS = {"replay": "", "step_cost": "", "core_ab": "", "engine_bench": "anpd_"}


@pytest.mark.parametrize("script", sorted(ANPD_OPTION_SCRIPTS))
@pytest.mark.parametrize("value, named", [
    ('{{"{p}n_max": 5', "is not JSON"),
    ("[5]", "expected a JSON object"),
    ('{{"{p}n_maxx": 5}}', "unknown key(s) '{p}n_maxx'"),
    ('{{"num_speculative_tokens": 3}}', "unknown key(s) 'num_speculative_tokens'"),
    ('{{"{p}stop_probability": 1.5}}', "{p}stop_probability=1.5: must be a number in [0.0, 1.0)"),
    ('{{"{p}n_min": 4, "{p}n_max": 3}}', "{p}n_max=3: must be an integer in [4, 16]"),
])
def test_benchmarks_refuse_a_bad_anpd_option_by_its_value_before_any_work(script, value, named, monkeypatch,
                                                                          capsys):
    """A malformed ``--anpd`` used to surface as a JSONDecodeError or a TypeError traceback (in engine_bench, from
    an engine's worker process); now argparse refuses it, quoting the value, before anything runs."""
    import importlib

    module = importlib.import_module(script)
    prefix = ANPD_OPTION_SCRIPTS[script]
    value = value.format(p=prefix)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--anpd", value])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --anpd" in err and repr(value) in err and named.format(p=prefix) in err


def test_a_checked_anpd_option_reaches_the_drafter_and_the_engine_config():
    import engine_bench
    from anpd_options import anpd_overrides, anpd_speculative_options

    assert anpd_overrides('{"n_max": 5, "min_count": [1, 1, 2, 2]}') == {"n_max": 5, "min_count": [1, 1, 2, 2]}
    assert anpd_overrides("{}") == {}
    options = anpd_speculative_options('{"anpd_stop_probability": 0.1}')
    args = SimpleNamespace(anpd=options)
    assert engine_bench.speculative_config("anpd", 5, args) == {
        "method": "anpd", "num_speculative_tokens": 5, "anpd_stop_probability": 0.1}


class _FakeEngine:
    """What ``engine_bench.run_phase`` uses of ``LLM.llm_engine``: each request finishes after one token."""

    def __init__(self):
        self.added, self.pending = [], []

    def add_request(self, request_id, prompt, params):
        self.added.append(params)
        self.pending.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step(self):
        done, self.pending = self.pending, []
        return [SimpleNamespace(request_id=r, finished=True, outputs=[SimpleNamespace(token_ids=[7])]) for r in done]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_bench_phase_is_greedy_or_seeded_per_request(temperature):
    """Greedy by default (outputs comparable token for token); sampled runs give each request its own seed,
    so two configurations sample alike wherever their drafts do not change the tokens."""
    import engine_bench

    engine = _FakeEngine()
    llm = SimpleNamespace(llm_engine=engine, get_metrics=lambda: [])
    job = {"method": "none", "spec": None, "max_tokens": 9}
    job |= {"temperature": temperature} if temperature else {}
    result = engine_bench.run_phase(llm, job, {"prompts": [[1, 2], [3], [4, 5]], "batch": 2}, has_drafter=False)
    assert result["tokens"] == [[7], [7], [7]]
    assert [(p.temperature, p.seed, p.max_tokens) for p in engine.added] == [
        (temperature, i if temperature else None, 9) for i in range(3)]


def test_engine_bench_refuses_a_batch_above_its_prompt_set(monkeypatch, capsys):
    """engine_bench.py's batched set is 5 prompts per category (65): a "batch 128" there would run at most 65."""
    import engine_bench

    monkeypatch.setattr(engine_bench, "run_method", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    monkeypatch.setattr(sys, "argv", ["engine_bench.py", "--batches", "1", "128", "--methods", "none"])
    with pytest.raises(SystemExit) as exit_:
        engine_bench.main()
    assert exit_.value.code == 2
    assert "--batches 128" in capsys.readouterr().err


def test_fixed_length_proposer_drafts_one_length_per_step_from_the_longest_context(monkeypatch):
    """``calibrate_cost.py --drafts`` labels each step's time with one draft length, so every row of a step
    must draft that length, even when the rows' contexts differ (prefills finished in different steps)."""
    from vllm_anpd.bench import fixed_length_proposer as flp

    monkeypatch.setenv(flp.ENV, "0,1,2,3,5")
    config = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=5))
    proposer = flp.FixedLengthProposer(config)
    # Contexts 12, 14 and 13 (row 1 sampled nothing: a partial prefill): the longest sampled one, 13 % 5 = 3.
    drafts = proposer.propose([[7], [], [9]], np.array([12, 14, 13]), None)
    assert drafts == [[0, 0, 0], [], [0, 0, 0]]
    assert proposer.propose([[7], [8]], np.array([10, 11]), None) == [[0], [0]]  # 11 % 5 = 1
    assert proposer.propose([[], []], np.array([10, 11]), None) == [[], []]
    monkeypatch.setenv(flp.ENV, "0,6")
    with pytest.raises(ValueError, match="VLLM_ANPD_DRAFT_SCHEDULE='0,6'"):
        flp.FixedLengthProposer(config)
