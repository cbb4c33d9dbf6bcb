"""Batch generation on Ray (vllm_anpd.batch): input validation, sharding, merge order, resume, retry after a
dead actor (with fake engines on a local Ray), and one real run: 2 ANPD engines give the same token ids as
one engine without speculation, and a resumed run rewrites the output byte for byte.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from vllm_anpd import batch

# --- helpers -----------------------------------------------------------------------------------------


def write_jsonl(path: Path, objs) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def prompt_rows(n: int) -> list[dict]:
    return [{"id": f"q{i}", "prompt": f"prompt number {i}"} for i in range(n)]


class FakeEngine:
    """Stands in for vLLM in the actors: output text is the prompt reversed, token ids [index, length].

    Every generate() appends its row indexes to LOG (actors are other processes), and adds one draft per
    row to its counters. With CRASH_INDEX, the first shard holding that row kills the actor's process,
    once (MARKER remembers it across the restart; without MARKER, every time), as a crashed engine or an
    OOM kill would. The restarted engine takes RESTART_SECONDS to build, as a real one takes minutes.
    """

    def __init__(self, log: str, crash_index: int | None = None, marker: str | None = None,
                 restart_seconds: float = 0.0):
        self.log, self.crash_index, self.marker = log, crash_index, marker
        self.drafts = 0
        if marker and os.path.exists(marker):
            time.sleep(restart_seconds)

    def generate(self, rows, sampling):
        indexes = [r["index"] for r in rows]
        if self.crash_index in indexes and not (self.marker and os.path.exists(self.marker)):
            if self.marker:
                Path(self.marker).touch()
            os._exit(1)
        with open(self.log, "a") as f:
            f.write(json.dumps(indexes) + "\n")
        self.drafts += len(rows)
        return [{"output_text": r["prompt"][::-1], "output_token_ids": [r["index"], len(r["prompt"])]}
                for r in rows]

    def spec_counters(self):
        return {"vllm:spec_decode_num_drafts": self.drafts, "vllm:spec_decode_num_draft_tokens": 5 * self.drafts,
                "vllm:spec_decode_num_accepted_tokens": 2 * self.drafts}


def logged_shards(log: Path) -> list[list[int]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    # The fakes live in this test module, which Ray's workers cannot import: ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# --- input validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("line, words", [
    ('{"prompt": "a"', ["line 2", "invalid JSON"]),
    ('["a"]', ["line 2", "JSON object", "list"]),
    ('{"text": "a"}', ["line 2", '"prompt"', '"prompt_token_ids"']),
    ('{"prompt": "a", "prompt_token_ids": [1]}', ["line 2", "exactly one"]),
    ('{"prompt": 7}', ["line 2", 'field "prompt"', "string"]),
    ('{"prompt": ""}', ["line 2", 'field "prompt"']),
    ('{"prompt_token_ids": [1, -2]}', ["line 2", 'field "prompt_token_ids"']),
    ('{"prompt_token_ids": "1 2"}', ["line 2", 'field "prompt_token_ids"']),
    ('{"prompt": "a", "id": [1]}', ["line 2", 'field "id"']),
    ('{"prompt": "a", "id": "x"}', ["line 2", 'field "id"', "line 1"]),  # repeats line 1's id
])
def test_invalid_rows_name_line_and_field(tmp_path, line, words):
    path = write_jsonl(tmp_path / "in.jsonl", ['{"prompt": "first", "id": "x"}', line])
    with pytest.raises(batch.PromptFileError) as err:
        batch.read_prompts(path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(batch.PromptFileError, match="no prompts"):
        batch.read_prompts(write_jsonl(tmp_path / "in.jsonl", ["", "  "]))


def test_rows_get_index_and_default_id_blank_lines_skipped(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", ['{"prompt": "a"}', "", '{"prompt_token_ids": [3, 4], "id": 9}',
                                               '{"prompt": "c", "id": "z", "extra": 1}'])
    assert batch.read_prompts(path) == [{"index": 0, "id": 0, "prompt": "a"},
                                        {"index": 1, "id": 9, "prompt_token_ids": [3, 4]},
                                        {"index": 2, "id": "z", "prompt": "c"}]


# --- shards, merge, manifest (no Ray) ----------------------------------------------------------------

def test_shards_are_fixed_size_in_order():
    rows = [{"index": i} for i in range(10)]
    shards = batch.make_shards(rows, 4)
    assert [[r["index"] for r in s] for s in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError):
        batch.make_shards(rows, 0)


def test_merge_follows_input_order_whatever_the_finishing_order(tmp_path):
    rows = [{"index": i, "id": i} for i in range(7)]
    shards = batch.make_shards(rows, 3)
    for shard_id in (2, 0, 1):  # written out of order, as engines finish
        batch.write_atomically(batch.shard_path(tmp_path, shard_id), batch.to_jsonl(shards[shard_id]))
    assert batch.merge_shards(tmp_path, shards, tmp_path / "out.jsonl") == 7
    assert [r["index"] for r in read_jsonl(tmp_path / "out.jsonl")] == list(range(7))
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_merge_refuses_a_shard_with_wrong_rows(tmp_path):
    shards = batch.make_shards([{"index": i} for i in range(4)], 2)
    batch.write_atomically(batch.shard_path(tmp_path, 0), batch.to_jsonl(shards[0]))
    batch.write_atomically(batch.shard_path(tmp_path, 1), batch.to_jsonl(shards[0]))
    with pytest.raises(RuntimeError, match="shard_00001"):
        batch.merge_shards(tmp_path, shards, tmp_path / "out.jsonl")


def test_work_dir_of_another_job_is_refused(tmp_path):
    rows = [{"index": 0, "id": 0, "prompt": "a"}]
    sampling = {"temperature": 0.0, "max_tokens": 8, "seed": 0}
    batch.claim_work_dir(tmp_path, batch.job_manifest(rows, 4, sampling, None, batch.DEFAULT_SPECULATIVE_CONFIG))
    batch.claim_work_dir(tmp_path, batch.job_manifest(rows, 4, sampling, None, batch.DEFAULT_SPECULATIVE_CONFIG))
    with pytest.raises(ValueError, match="shard_size"):
        batch.claim_work_dir(tmp_path, batch.job_manifest(rows, 5, sampling, None, batch.DEFAULT_SPECULATIVE_CONFIG))
    other = [{"index": 0, "id": 0, "prompt": "b"}]
    with pytest.raises(ValueError, match="input_sha256"):
        batch.claim_work_dir(tmp_path, batch.job_manifest(other, 4, sampling, None, batch.DEFAULT_SPECULATIVE_CONFIG))


# --- core pinning ------------------------------------------------------------------------------------

def test_engines_of_one_machine_claim_different_cores(restored_environ, tmp_path, monkeypatch):
    # pin_engine_cores sets VLLM_CPU_OMP_THREADS_BIND in this process: restored_environ keeps it from binding the
    # engines of every later test to cores 0 and 1 (vLLM CPU's own default binding leaves a core to the engine
    # core process).
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    claimed = []
    for _ in range(3):  # each claim stands for one engine process; its locks are held until it exits
        locks = batch.pin_engine_cores(2, lock_dir=tmp_path)
        claimed.append((os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None), locks))
    assert [binding for binding, _ in claimed] == ["0,1", "2,3", None]  # one core left: too few for a third
    for lock in claimed[0][1]:  # the first engine exits: its cores are free again
        lock.close()
    assert batch.pin_engine_cores(2, lock_dir=tmp_path) and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"


def test_a_binding_set_by_the_user_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    assert batch.pin_engine_cores(1, lock_dir=tmp_path) is None
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


# --- run_batch on a local Ray, fake engines -----------------------------------------------------------

def test_run_batch_fake_engines_output_in_input_order(local_ray, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", prompt_rows(10))
    log = tmp_path / "calls.log"
    summary = batch.run_batch(src, tmp_path / "out.jsonl", num_engines=2, shard_size=3, progress=False,
                              engine_factory=lambda: FakeEngine(str(log)))
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["index"] for r in out] == list(range(10))
    assert out[4] == {"id": "q4", "index": 4, "prompt": "prompt number 4", "output_text": "4 rebmun tpmorp",
                      "output_token_ids": [4, 15], "num_output_tokens": 2}
    assert sorted(map(tuple, logged_shards(log))) == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9,)]
    assert (summary.num_shards, summary.resumed_shards, summary.retried_shards) == (4, 0, 0)
    assert summary.output_tokens == 20
    assert summary.spec["vllm:spec_decode_num_drafts"] == 10  # per-shard deltas, summed over both engines
    assert "tok/s" in summary.report()
    assert "acceptance rate 0.400, mean acceptance length 3.00" in summary.report()


def test_rerun_skips_finished_shards_and_rewrites_the_same_output(local_ray, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", prompt_rows(8))
    log, out = tmp_path / "calls.log", tmp_path / "out.jsonl"
    run = dict(num_engines=2, shard_size=2, work_dir=tmp_path / "work", progress=False,
               engine_factory=lambda: FakeEngine(str(log)))
    batch.run_batch(src, out, **run)
    first = out.read_bytes()
    log.unlink()
    out.unlink()
    batch.shard_path(tmp_path / "work", 2).unlink()

    summary = batch.run_batch(src, out, **run)
    assert logged_shards(log) == [[4, 5]]  # only the missing shard ran again
    assert summary.resumed_shards == 3 and summary.output_tokens == 4
    assert out.read_bytes() == first

    log.unlink()  # all shards there: nothing runs at all, and no Ray actor is started
    assert batch.run_batch(src, out, **run).resumed_shards == 4
    assert not log.exists() and out.read_bytes() == first


@pytest.mark.parametrize("restart_seconds", [0.0, 4.0])
def test_dead_actor_shard_is_retried_without_loss_or_duplication(local_ray, tmp_path, restart_seconds):
    src = write_jsonl(tmp_path / "in.jsonl", prompt_rows(9))
    log, marker = tmp_path / "calls.log", tmp_path / "crashed"
    # While Ray restarts the dead engine, calls to it fail at once: the shard must not be spent on it.
    summary = batch.run_batch(src, tmp_path / "out.jsonl", num_engines=2, shard_size=2, progress=False,
                              engine_factory=lambda: FakeEngine(str(log), crash_index=5, marker=str(marker),
                                                                restart_seconds=restart_seconds))
    assert marker.exists()  # the actor did die once
    assert summary.retried_shards == 1
    assert [r["index"] for r in read_jsonl(tmp_path / "out.jsonl")] == list(range(9))
    ran = sorted(i for shard in logged_shards(log) for i in shard)
    assert ran == list(range(9))  # every row generated once: the dead attempt left nothing
    assert summary.spec["vllm:spec_decode_num_drafts"] == 9


def test_shard_that_always_kills_its_engine_fails_the_run(local_ray, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", prompt_rows(4))
    with pytest.raises(batch.ShardFailed, match="shard 1 lost its engine 2 times"):
        batch.run_batch(src, tmp_path / "out.jsonl", num_engines=1, shard_size=2, max_retries=1, progress=False,
                        engine_factory=lambda: FakeEngine(str(tmp_path / "log"), crash_index=3))
    assert batch.shard_path(tmp_path / "out.jsonl.shards", 0).exists()  # the good shard is kept for a rerun


def test_too_many_engines_for_a_local_machine_is_an_error(local_ray, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", prompt_rows(4))
    with pytest.raises(ValueError, match="exceed"):
        batch.run_batch(src, tmp_path / "out.jsonl", num_engines=3, shard_size=1, progress=False,
                        engine_factory=lambda: FakeEngine(str(tmp_path / "log")))


# --- the real engine ---------------------------------------------------------------------------------

@pytest.mark.engine
def test_two_anpd_engines_equal_one_engine_without_speculation(local_ray, tmp_path):
    from engine_helpers import greedy, make_llm, shutdown, spec_bench_prompts, token_ids

    max_tokens = 48
    # Eager mode on both sides: vLLM CPU recompiles the model at every engine start (its compile cache fails
    # to load here), about 2 minutes an engine; the compiled path was checked the same way by hand.
    eager = {"enforce_eager": True}
    # The reference: one plain engine in this process, no speculation, float32 greedy.
    llm = make_llm(None, kv_cache_memory_bytes=2**30, **eager)
    try:
        tokenizer = llm.get_tokenizer()
        prompts = spec_bench_prompts(tokenizer, per_category=1)[:12]
        rows = [{"id": f"sb{i}", "prompt": p} for i, p in enumerate(prompts)]
        rows[5] = {"id": "sb5", "prompt_token_ids": tokenizer.encode(prompts[5])}  # the token-id input path
        inputs = [r.get("prompt") or {"prompt_token_ids": r["prompt_token_ids"]} for r in rows]
        expected = token_ids(llm.generate(inputs, greedy(max_tokens), use_tqdm=False))
    finally:
        shutdown(llm)

    src, out, work = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", tmp_path / "work"
    run = dict(num_engines=2, shard_size=4, max_tokens=max_tokens, work_dir=work, engine_args=eager, progress=False)
    summary = batch.run_batch(src, out, **run)
    print(summary.report())
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [r["id"] for r in rows]
    mismatched = [i for i, (g, e) in enumerate(zip(got, expected)) if g["output_token_ids"] != e]
    assert not mismatched, f"{len(mismatched)} outputs differ from the engine without speculation: {mismatched}"
    assert got[5]["prompt"] is None and got[0]["prompt"] == prompts[0]
    assert summary.spec["vllm:spec_decode_num_drafts"] > 0  # ANPD really drafted in the actors
    assert summary.spec["vllm:spec_decode_num_accepted_tokens"] > 0

    first = out.read_bytes()
    out.unlink()
    for shard_id in (0, 2):
        batch.shard_path(work, shard_id).unlink()
    again = batch.run_batch(src, out, **run)
    print(again.report())
    assert again.resumed_shards == 1
    assert out.read_bytes() == first
