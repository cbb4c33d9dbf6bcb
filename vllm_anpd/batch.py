"""Data-parallel batch generation with ANPD speculative decoding, on Ray.

    python -m vllm_anpd.batch --input prompts.jsonl --output out.jsonl --num-engines 2

Input: one JSON object a line, with "prompt" (text) or "prompt_token_ids" (a list of token ids), and an
optional "id" (string or integer; default: the row's index). Output: one line per input row, in input order:
{"id", "index", "prompt", "output_text", "output_token_ids", "num_output_tokens"} ("prompt" is null for
token-id rows).

How it runs
    The rows are cut into fixed-size shards. N Ray actors each hold an ordinary vLLM ``LLM`` configured
    with ANPD (default ``{"method": "anpd", "num_speculative_tokens": 5}``) and take one shard at a time.
    The driver writes each finished shard to ``WORK_DIR/shard_XXXXX.jsonl`` atomically (temporary file,
    then rename), so a shard file on disk is always complete. Then it merges the shards into ``--output``.

Resume and retry
    Rerun the same command after a crash or Ctrl-C: shards already on disk are skipped. WORK_DIR (default
    ``OUTPUT.shards``) holds a manifest of the job (input digest, shard size, sampling, model, speculative
    config); a rerun with a different job refuses to mix the two. A shard whose actor died (killed, OOM,
    crashed engine) is resubmitted, and Ray restarts the actor (``max_restarts``); a shard reaches the
    output exactly once, since only the driver writes shards and only from a completed result.
    Sampling with temperature > 0 uses a per-row seed (``--seed`` + index), so a rerun shard draws the
    same tokens whichever engine or batch it lands in.

Multi-node
    The same command runs on a cluster unchanged: start Ray on every node (``ray start --head`` on one,
    ``ray start --address HEAD:6379`` on the others), then run it with ``--address auto`` on any node. The
    actors are spread over the nodes; only the driver touches the input, WORK_DIR and the output, so they
    need not be on shared storage. Each node needs this package, vLLM and the model (``--model`` must be a
    path valid on every node; the default embedded model is prepared on each node from its wheel).
    Without ``--address``, a local Ray is started with as many CPUs as the machine has.

CPU notes (vLLM CPU)
    vLLM's Ray *executor* refuses the CPU platform, so each actor holds a plain ``LLM`` (multiprocessing
    executor: engine-core and worker processes under the actor; they exit when the actor dies). Each
    engine asks Ray for ``--cpus-per-engine`` CPUs (default 1) and gets an explicit KV cache
    (``--kv-cache-gib``, default 1 GiB) instead of vLLM CPU's default, a fraction of the machine's memory
    that every engine would claim. Each engine claims free cores of its machine and pins its OpenMP
    threads to them (``VLLM_CPU_OMP_THREADS_BIND``, see ``pin_engine_cores``): with vLLM's automatic
    binding every engine of a machine binds to the same cores. Measured on 2 cores (24 Spec-Bench prompts, 128 tokens,
    eager): 1 engine 36 tok/s; 2 engines pinned to cores 0 and 1, 74 tok/s; 2 engines with the automatic
    binding, 35 tok/s. Compiled (the default), 1 engine gives 47 tok/s, but vLLM CPU recompiles the model
    at every engine start here (its compile cache fails to load), about 2 minutes an engine;
    ``--engine-args '{"enforce_eager": true}'`` starts in about 1 minute.

Ray Data LLM (``ray.data.llm``) instead?
    It can run here, but only around four obstacles, and it would lose what this module adds. (1) Its
    ``ray[llm]`` extra pins ``vllm[audio]==0.29.0`` (the CUDA build, with nixl-cu13), which would replace
    vllm-cpu 0.32.0 and torch; it has to be used from ``ray[data]`` with the vLLM already installed.
    (2) Each replica asks Ray for a GPU unless ``placement_group_config={"bundles": [{"CPU": 1}]}``.
    (3) ``log_engine_metrics`` (on by default) imports ``ray.serve`` through vLLM's Ray metrics wrapper,
    which needs ``ray[serve]``; off, it ran ANPD on CPU (checked with vllm-cpu 0.32.0, Ray 2.60.0).
    (4) All replicas share one runtime environment, so they cannot be pinned to different cores: on one
    machine, several replicas all bind to the same cores (no speed-up, as measured above). It also has no
    resumable shard files and no spec-decode counters per shard.

Programmatic use: ``run_batch(input_path, output_path, ...)`` returns a ``BatchSummary``; its
``engine_factory`` argument swaps the vLLM engine for any picklable zero-argument callable that returns an
object with ``generate(rows, sampling)`` and ``spec_counters()`` (the tests use fakes).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger("vllm_anpd.batch")

DEFAULT_SPECULATIVE_CONFIG = {"method": "anpd", "num_speculative_tokens": 5}
SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")
MANIFEST = "manifest.json"



# --- input -------------------------------------------------------------------------------------------

class PromptFileError(ValueError):
    """A malformed prompts file; the message names the file, the line and the field."""


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Validated rows: {"index", "id", "prompt" or "prompt_token_ids"}. Blank lines are skipped."""
    rows: list[dict] = []
    first_line_of_id: dict[Any, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue

            def bad(msg: str) -> PromptFileError:
                return PromptFileError(f"{path} line {line_no}: {msg}")

            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise bad(f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise bad(f"expected a JSON object, got {type(obj).__name__}")
            has_text, has_ids = "prompt" in obj, "prompt_token_ids" in obj
            if has_text == has_ids:
                raise bad('exactly one of the fields "prompt" and "prompt_token_ids" is required')
            row: dict[str, Any] = {"index": len(rows)}
            if has_text:
                if not isinstance(obj["prompt"], str) or not obj["prompt"]:
                    raise bad(f'field "prompt" must be a non-empty string, got {obj["prompt"]!r:.60}')
                row["prompt"] = obj["prompt"]
            else:
                ids = obj["prompt_token_ids"]
                if (not isinstance(ids, list) or not ids
                        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
                    raise bad('field "prompt_token_ids" must be a non-empty list of non-negative integers')
                row["prompt_token_ids"] = ids
            row_id = obj.get("id", row["index"])
            if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
                raise bad(f'field "id" must be a string or an integer, got {type(row_id).__name__}')
            if row_id in first_line_of_id:
                raise bad(f'field "id" {row_id!r} repeats the id of line {first_line_of_id[row_id]}')
            first_line_of_id[row_id] = line_no
            row["id"] = row_id
            rows.append(row)
    if not rows:
        raise PromptFileError(f"{path}: no prompts")
    return rows


def make_shards(rows: list[dict], shard_size: int) -> list[list[dict]]:
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    return [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)]


# --- work dir: manifest, shard files, merge ----------------------------------------------------------

def shard_path(work_dir: Path, shard_id: int) -> Path:
    return work_dir / f"shard_{shard_id:05d}.jsonl"


def write_atomically(path: Path, text: str) -> None:
    """Readers (a rerun, the merge) see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def job_manifest(rows: list[dict], shard_size: int, sampling: dict, model: str | None,
                 speculative_config: dict | None, engine_args: dict | None = None) -> dict:
    """What makes two runs the same job, so that their shards can be mixed."""
    digest = hashlib.sha256(to_jsonl(rows).encode()).hexdigest()
    return {"num_rows": len(rows), "input_sha256": digest, "shard_size": shard_size, "sampling": sampling,
            "model": model, "speculative_config": speculative_config, "engine_args": engine_args or {}}


def claim_work_dir(work_dir: Path, manifest: dict) -> None:
    """Create WORK_DIR for this job, or check that the shards already there belong to it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        differing = sorted(k for k in manifest.keys() | old.keys() if old.get(k) != manifest.get(k))
        if differing:
            raise ValueError(f"{work_dir} holds shards of another job ({', '.join(differing)} differ); "
                             "use another --work-dir or delete it")
    else:
        write_atomically(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def finished_shards(work_dir: Path, shards: list[list[dict]]) -> set[int]:
    return {i for i in range(len(shards)) if shard_path(work_dir, i).exists()}


def merge_shards(work_dir: Path, shards: list[list[dict]], output: Path) -> int:
    """Concatenate the shard files in input order into OUTPUT, checking each row is there exactly once."""
    lines = []
    for shard_id, shard in enumerate(shards):
        text = shard_path(work_dir, shard_id).read_text(encoding="utf-8")
        shard_lines = text.splitlines(keepends=True)
        got = [json.loads(line)["index"] for line in shard_lines]
        want = [row["index"] for row in shard]
        if got != want:
            raise RuntimeError(f"{shard_path(work_dir, shard_id)} holds rows {got}, expected {want}")
        lines.extend(shard_lines)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(output, "".join(lines))
    return len(lines)


# --- engines -----------------------------------------------------------------------------------------

class VllmEngine:
    """One vLLM ``LLM`` with a speculative config; what each Ray actor holds."""

    def __init__(self, model: str | None = None, speculative_config: dict | None = None,
                 kv_cache_gib: float = 1.0, max_num_seqs: int | None = None, cpus_per_engine: int = 1,
                 **engine_overrides):
        self.core_locks = pin_engine_cores(cpus_per_engine)  # before vLLM reads its environment
        from vllm import LLM

        from vllm_anpd import models

        kwargs = models.engine_kwargs(
            # An explicit KV cache size: the default, a fraction of the machine's memory, is taken by every
            # engine, so two on one machine would ask for twice that.
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
            distributed_executor_backend="mp",
            disable_log_stats=False,  # keeps the spec-decode counters read by spec_counters()
            worker_extension_cls="vllm_anpd.worker_extension.AnpdWorkerExtension",
            **engine_overrides)
        kwargs.pop("gpu_memory_utilization", None)
        if model:
            kwargs["model"] = model
        if max_num_seqs:
            kwargs["max_num_seqs"] = max_num_seqs
        self.llm = LLM(speculative_config=speculative_config, **kwargs)

    def generate(self, rows: list[dict], sampling: dict) -> list[dict]:
        from vllm import SamplingParams

        prompts, params = [], []
        for row in rows:
            prompts.append(row["prompt"] if "prompt" in row else {"prompt_token_ids": row["prompt_token_ids"]})
            seed = sampling["seed"] + row["index"] if sampling["temperature"] > 0 else None
            params.append(SamplingParams(temperature=sampling["temperature"], max_tokens=sampling["max_tokens"],
                                         seed=seed))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [{"output_text": o.outputs[0].text, "output_token_ids": list(o.outputs[0].token_ids)}
                for o in outputs]

    def spec_counters(self) -> dict[str, int]:
        totals = dict.fromkeys(SPEC_COUNTERS, 0)
        for metric in self.llm.get_metrics():
            if metric.name in totals:  # one sample per label set (engine index, model name): add them up
                totals[metric.name] += int(getattr(metric, "value", 0) or 0)
        return totals

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()  # stops the engine-core and worker processes


class ShardWorker:
    """The Ray actor: builds its engine once, then generates one shard per call."""

    def __init__(self, engine_factory: Callable[[], Any]):
        self.engine = engine_factory()

    def where(self) -> str:
        import socket

        return f"{socket.gethostname()}:{os.getpid()}"

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()

    def run_shard(self, shard_id: int, rows: list[dict], sampling: dict) -> dict:
        before = self.engine.spec_counters()
        generated = self.engine.generate(rows, sampling)
        after = self.engine.spec_counters()
        out_rows = [{"id": row["id"], "index": row["index"], "prompt": row.get("prompt"),
                     "output_text": g["output_text"], "output_token_ids": g["output_token_ids"],
                     "num_output_tokens": len(g["output_token_ids"])}
                    for row, g in zip(rows, generated, strict=True)]
        # Counter deltas, not totals: a restarted actor starts from zero, and a failed attempt never counts.
        spec = {k: after.get(k, 0) - before.get(k, 0) for k in SPEC_COUNTERS}
        return {"shard_id": shard_id, "rows": out_rows, "spec": spec}


def pin_engine_cores(cpus_per_engine: int, lock_dir: str | os.PathLike | None = None):
    """Claim CPUS_PER_ENGINE free cores of this machine for one engine and bind its OpenMP threads to them.

    Why: vLLM CPU's automatic binding gives a one-NUMA-node machine's cores (less one kept for the
    engine-core process) to *the* engine, so every engine on the machine binds to the same cores. A core is
    claimed with an exclusive lock on a per-core file, held by this process: engines of one machine, of
    any job, get different cores, and a dead engine's cores free themselves. Sets
    ``VLLM_CPU_OMP_THREADS_BIND``, read by the engine processes started afterwards. Returns the held lock
    files, or None (vLLM's own binding stays) when the binding was set by the user or too few cores are free.
    """
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return None
    lock_dir = Path(lock_dir or tempfile.gettempdir())
    held = []
    for core in sorted(os.sched_getaffinity(0)):
        lock = open(lock_dir / f"vllm_anpd_core_{core}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        held.append((core, lock))
        if len(held) == cpus_per_engine:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c, _ in held)
            return [lock for _, lock in held]
    for _, lock in held:
        lock.close()
    return None


# --- driver ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class BatchSummary:
    num_rows: int
    num_shards: int
    resumed_shards: int  # already on disk when the run started
    retried_shards: int  # attempts lost to a dead actor and run again
    output_tokens: int  # generated in this run (resumed shards not counted)
    generation_seconds: float  # from the engines being ready to the last shard
    startup_seconds: float  # Ray and the engines
    spec: dict[str, int]  # spec-decode counters summed over this run's shards

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def report(self) -> str:
        lines = [f"{self.num_rows} rows in {self.num_shards} shards ({self.resumed_shards} resumed, "
                 f"{self.retried_shards} retried); engines ready in {self.startup_seconds:.1f} s",
                 f"throughput: {self.output_tokens} output tokens in {self.generation_seconds:.1f} s = "
                 f"{self.tokens_per_second:.1f} tok/s"]
        drafts, drafted, accepted = (self.spec.get(k, 0) for k in SPEC_COUNTERS)
        if drafts:
            # "Mean acceptance length" as vLLM logs it: tokens per verification step, the bonus token included.
            lines.append(f"speculation: {drafts} drafts, {drafted} draft tokens, {accepted} accepted: acceptance "
                         f"rate {accepted / max(drafted, 1):.3f}, mean acceptance length {1 + accepted / drafts:.2f}")
        elif self.output_tokens:
            lines.append("speculation: no drafts in this run")
        return "\n".join(lines)


class ShardFailed(RuntimeError):
    pass


def run_batch(input_path: str | os.PathLike, output_path: str | os.PathLike, *, num_engines: int = 1,
              address: str | None = None, speculative_config: dict | None = DEFAULT_SPECULATIVE_CONFIG,
              max_tokens: int = 128, temperature: float = 0.0, seed: int = 0, shard_size: int = 16,
              work_dir: str | os.PathLike | None = None, model: str | None = None, kv_cache_gib: float = 1.0,
              cpus_per_engine: int = 1, engine_args: dict | None = None, max_retries: int = 3,
              engine_factory: Callable[[], Any] | None = None, progress: bool = True) -> BatchSummary:
    """Generate a completion for every row of INPUT_PATH into OUTPUT_PATH; see the module docstring."""
    import ray
    from ray.exceptions import ActorUnavailableError, OutOfMemoryError, RayActorError, RayTaskError
    from tqdm import tqdm

    if num_engines < 1 or cpus_per_engine < 1:
        raise ValueError("num_engines and cpus_per_engine must be at least 1")
    rows = read_prompts(input_path)
    shards = make_shards(rows, shard_size)
    output = Path(output_path)
    work = Path(work_dir) if work_dir else output.with_name(output.name + ".shards")
    sampling = {"temperature": float(temperature), "max_tokens": int(max_tokens), "seed": int(seed)}
    claim_work_dir(work, job_manifest(rows, shard_size, sampling, model, speculative_config, engine_args))
    done = finished_shards(work, shards)
    todo = deque(i for i in range(len(shards)) if i not in done)

    summary = BatchSummary(num_rows=len(rows), num_shards=len(shards), resumed_shards=len(done), retried_shards=0,
                           output_tokens=0, generation_seconds=0.0, startup_seconds=0.0,
                           spec=dict.fromkeys(SPEC_COUNTERS, 0))
    if not todo:
        merge_shards(work, shards, output)
        return summary

    started = time.perf_counter()
    we_started_ray = not ray.is_initialized()
    if we_started_ray:
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    available = ray.cluster_resources().get("CPU", 0)
    if num_engines * cpus_per_engine > available:
        msg = f"{num_engines} engines x {cpus_per_engine} CPUs exceed the cluster's {available:g} CPUs"
        # One machine and no cluster address: nothing will ever add CPUs, the extra engines would wait forever.
        # A joined cluster may autoscale, so there the extra engines wait.
        if not address and len([n for n in ray.nodes() if n["Alive"]]) == 1:
            raise ValueError(msg)
        logger.warning("%s; the extra engines wait for resources", msg)

    if engine_factory is None:
        engine_factory = functools.partial(VllmEngine, model=model, speculative_config=speculative_config,
                                           kv_cache_gib=kv_cache_gib, max_num_seqs=shard_size,
                                           cpus_per_engine=cpus_per_engine, **(engine_args or {}))
    # max_restarts: Ray rebuilds a dead actor (and its engine); the driver resubmits what it was running.
    worker_cls = ray.remote(num_cpus=cpus_per_engine, max_restarts=max_retries, max_task_retries=0,
                            scheduling_strategy="SPREAD")(ShardWorker)
    num_engines = min(num_engines, len(todo))
    workers = []
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
           "OMP_NUM_THREADS": str(cpus_per_engine)}  # the actor's own torch threads
    for _ in range(num_engines):
        workers.append(worker_cls.options(runtime_env={"env_vars": env}).remote(engine_factory))
    try:
        # Wait for every engine before timing generation, and surface a failing engine start at once.
        logger.info("engines ready: %s", ", ".join(ray.get([w.where.remote() for w in workers])))
        summary.startup_seconds = time.perf_counter() - started

        gen_started = time.perf_counter()
        attempts = dict.fromkeys(todo, 0)
        idle = deque(range(len(workers)))
        probe_at: dict[int, float] = {}  # engine being restarted by Ray -> when to ask again whether it is up
        calls: dict[Any, tuple[int, int | None]] = {}  # object ref -> (engine, shard; None for a probe)
        with tqdm(total=len(shards), initial=len(done), unit="shard", disable=not progress) as bar:
            while todo or any(shard_id is not None for _, shard_id in calls.values()):
                for w, when in list(probe_at.items()):
                    if when <= time.monotonic():
                        del probe_at[w]
                        calls[workers[w].where.remote()] = (w, None)
                while todo and idle:  # one shard in flight per engine: the best balance at the tail
                    w, shard_id = idle.popleft(), todo.popleft()
                    calls[workers[w].run_shard.remote(shard_id, shards[shard_id], sampling)] = (w, shard_id)
                if not calls and not probe_at:
                    raise ShardFailed(f"every engine died; shards {sorted(todo)} not done")
                ready, _ = ray.wait(list(calls), num_returns=1, timeout=1.0)
                if not ready:
                    continue
                w, shard_id = calls.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except (RayActorError, OutOfMemoryError) as e:
                    # The engine's actor died (killed, OOM, crashed engine) or is still being restarted by Ray.
                    # A restarting actor refuses calls at once, so it gets no shard until a probe finds it up.
                    if shard_id is None:  # a probe: still restarting, or dead for good (out of restarts)
                        if isinstance(e, ActorUnavailableError):
                            probe_at[w] = time.monotonic() + 2.0
                        continue
                    probe_at[w] = time.monotonic() + 2.0
                    # Nothing of the lost attempt was written, so the shard runs again, on any engine.
                    attempts[shard_id] += 1
                    summary.retried_shards += 1
                    if attempts[shard_id] > max_retries:
                        raise ShardFailed(f"shard {shard_id} lost its engine {attempts[shard_id]} times") from e
                    logger.warning("shard %d: engine %d lost (%s); retrying", shard_id, w, type(e).__name__)
                    todo.appendleft(shard_id)
                    continue
                except RayTaskError as e:  # the engine refused the shard (a Python error): retrying won't help
                    if shard_id is None:
                        raise
                    first, last = shards[shard_id][0]["index"], shards[shard_id][-1]["index"]
                    raise ShardFailed(f"shard {shard_id} (rows {first}-{last}) failed: {e}") from e
                idle.append(w)
                if shard_id is None:
                    continue
                write_atomically(shard_path(work, shard_id), to_jsonl(result["rows"]))
                summary.output_tokens += sum(r["num_output_tokens"] for r in result["rows"])
                for k in SPEC_COUNTERS:
                    summary.spec[k] += result["spec"].get(k, 0)
                bar.update(1)
        summary.generation_seconds = time.perf_counter() - gen_started
    finally:
        # Shut the engines down before killing their actors, so that no engine process outlives its actor.
        ray.wait([w.close.remote() for w in workers], num_returns=len(workers), timeout=60)
        for w in workers:
            ray.kill(w)
        if we_started_ray:
            ray.shutdown()
    merge_shards(work, shards, output)
    return summary


# --- command line ------------------------------------------------------------------------------------

def _speculative_config(text: str) -> dict | None:
    value = json.loads(text)
    if value is not None and not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a JSON object, or null for no speculation")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_anpd.batch", description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, help="JSONL of prompts")
    ap.add_argument("--output", required=True, help="JSONL of completions, in input order")
    ap.add_argument("--num-engines", type=int, default=1, help="Ray actors, one vLLM engine each")
    ap.add_argument("--address", default=None, help="join this Ray cluster ('auto', HOST:6379); default: local")
    ap.add_argument("--speculative-config", type=_speculative_config, default=DEFAULT_SPECULATIVE_CONFIG,
                    help=f"JSON, or null for no speculation (default {json.dumps(DEFAULT_SPECULATIVE_CONFIG)})")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0, help="row i samples with seed SEED+i (temperature > 0)")
    ap.add_argument("--shard-size", type=int, default=16, help="rows per shard (and per engine batch)")
    ap.add_argument("--work-dir", default=None, help="finished shards, for resuming (default: OUTPUT.shards)")
    ap.add_argument("--model", default=None, help="HF model folder (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache per engine")
    ap.add_argument("--cpus-per-engine", type=int, default=1)
    ap.add_argument("--engine-args", type=json.loads, default=None,
                    help='more LLM(...) arguments as JSON, e.g. \'{"enforce_eager": true}\'')
    ap.add_argument("--max-retries", type=int, default=3, help="per shard, when its engine dies")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run_batch(args.input, args.output, num_engines=args.num_engines, address=args.address,
                            speculative_config=args.speculative_config, max_tokens=args.max_tokens,
                            temperature=args.temperature, seed=args.seed, shard_size=args.shard_size,
                            work_dir=args.work_dir, model=args.model, kv_cache_gib=args.kv_cache_gib,
                            cpus_per_engine=args.cpus_per_engine, engine_args=args.engine_args,
                            max_retries=args.max_retries)
    except (PromptFileError, ShardFailed, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.report())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
