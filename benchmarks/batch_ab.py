"""Alternating A/B of engine configurations at one batch size: where does speculation's cost come from?

    python benchmarks/batch_ab.py [--batch 32] [--prompts 48] [--repeats 2] [--configs none none-sync anpd-zero anpd]
    python benchmarks/batch_ab.py --batch 64 --per-category 10 --prompts 130 --configs none ngram suffix anpd
    python benchmarks/batch_ab.py --batch 1 --per-category 1 --prompts 13 --configs none ngram suffix anpd

Configurations (each run in its own engine process, one after the other, in rounds, each round's order rotated by
one, so drift hits all alike):
* ``none``: no speculation (vLLM then uses async scheduling);
* ``none-sync``: no speculation, ``async_scheduling=False``. On a GPU this is what every CPU-side proposer
  gets (vLLM disables async scheduling for the ngram, suffix and custom_class methods). vLLM CPU turns
  async scheduling off for every engine (``vllm/platforms/cpu.py``), so here it is the same engine as
  ``none`` run again: a direct measure of the run-to-run noise;
* ``anpd-zero``: ANPD with a gate no successor passes (speculative decoding on, no draft ever);
* ``null``: a proposer that returns no draft and does nothing else (``bench/fixed_length_proposer.py``, whose
  default schedule is 0): speculative decoding on, vLLM's own share of ``anpd-zero``'s cost;
* ``null-vllm``: ``null`` with the plugin off (``VLLM_ANPD_DISABLE=1``): vLLM's speculative path without
  the plugin's fixes for vLLM CPU (README, "vLLM CPU fixes the plugin carries");
* ``anpd``: ANPD's defaults (verify cost measured from the engine's step times);
* ``anpd-fixed``: ANPD with the verify cost fixed at its configured 0.07 (``anpd_measure_verify_cost: false``);
* ``anpd-stop0.05``, ``anpd-stop0.1``: ANPD with that stop probability (the default's candidates);
* ``ngram``, ``suffix``: vLLM's built-in methods as the engine benchmark runs them (k = 5; ngram with
  prompt_lookup 2..4; suffix needs arctic-inference);
* ``ngram-default``: vLLM's ngram with vLLM's defaults (k = 5, prompt_lookup 5..5);
* ``abl-paper``, ``abl-levels``, ``abl-stop``, ``abl-budget``, then ``anpd``: the ablation of section 3 of
  BENCHMARKS.md on the engine, each adding one component: the paper's ANPD (levels n = 2..5, fixed k, no
  shared table), levels up to n = 7, the adaptive stop probability, the batch-aware budget (verify cost
  measured on the engine), the shared cross-request table (= ANPD's defaults).
Spec-Bench first turns (``--per-category``, 5 by default: the engine benchmark's batched set), greedy
(``--temperature`` samples, one seed per request), float32, max_tokens 128 (``--max-tokens``),
closed loop with ``--batch`` requests in flight (``engine_bench.run_phase``). Appends one JSON line per run to
results/batch_ab.jsonl (lines of 2026-11-23 count engine steps in ``steps``; later ones give ``mat``; lines
from 2026-11-27 afternoon on name their ``machine``, earlier ones do not; from 2026-11-27 night on, ``propose_us``
is the wall time of each ``propose`` call of the drafter, as the engine pays it) and prints a summary (tok/s per
configuration, its ratio to the same round's ``none`` run, MAT, median microseconds per ``propose`` call).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import engine_bench  # the sampling convention shared by every benchmark (beside this script, on sys.path)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NEVER = 2**30  # a minimum count no successor reaches
# The ablation's switches, each also turning off the components that come after it in the ablation.
_ANPD = {"method": "anpd", "num_speculative_tokens": 5}
_NO_CROSS = {"anpd_cross_request_entries": 0}
_NO_BUDGET = {**_NO_CROSS, "anpd_verify_cost": 0.0, "anpd_measure_verify_cost": False}
_NO_STOP = {**_NO_BUDGET, "anpd_stop_probability": 0.0}
_NULL = {"method": "custom_class", "model": "vllm_anpd.bench.fixed_length_proposer.FixedLengthProposer",
         "num_speculative_tokens": 5}
CONFIGS = {
    "none": (None, {}),
    "none-sync": (None, {"async_scheduling": False}),
    "anpd-zero": ({"method": "anpd", "num_speculative_tokens": 5, "anpd_min_count": NEVER,
                   "anpd_cross_min_count": NEVER}, {}),
    # A proposer that never drafts and does no work: what vLLM's speculative path costs by itself.
    "null": (_NULL, {}),
    "null-vllm": (_NULL, {}),  # the plugin is turned off in run_one
    "anpd": ({"method": "anpd", "num_speculative_tokens": 5}, {}),
    "anpd-fixed": ({"method": "anpd", "num_speculative_tokens": 5, "anpd_measure_verify_cost": False}, {}),
    "anpd-stop0.05": ({"method": "anpd", "num_speculative_tokens": 5, "anpd_stop_probability": 0.05}, {}),
    "anpd-stop0.1": ({"method": "anpd", "num_speculative_tokens": 5, "anpd_stop_probability": 0.1}, {}),
    # The ablation: each row adds one component to the one before (PAPER in vllm_anpd/core/config.py).
    "abl-paper": ({**_ANPD, **_NO_STOP, "anpd_n_max": 5}, {}),
    "abl-levels": ({**_ANPD, **_NO_STOP}, {}),
    "abl-stop": ({**_ANPD, **_NO_BUDGET}, {}),
    "abl-budget": ({**_ANPD, **_NO_CROSS}, {}),
    "ngram": ({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 4}, {}),
    # vLLM's default ngram: without prompt_lookup_* vLLM 0.32 sets min = max = 5 (what an untuned user gets).
    "ngram-default": ({"method": "ngram", "num_speculative_tokens": 5}, {}),
    "suffix": ({"method": "suffix", "num_speculative_tokens": 5}, {}),
}


DEFAULT_CONFIGS = ("none", "none-sync", "anpd-zero", "anpd")


def run_one(name: str, batch: int, n_prompts: int, per_category: int, max_tokens: int = 128,
            temperature: float = 0.0) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_anpd import models

    spec, extra = CONFIGS[name]
    if name in ("null", "null-vllm"):
        from vllm_anpd.bench import fixed_length_proposer

        os.environ[fixed_length_proposer.ENV] = "0"  # never a draft, whatever the caller's environment says
    if name == "null-vllm":
        from vllm_anpd import plugin

        os.environ[plugin.DISABLE_ENV] = "1"  # read by the plugin in every engine process, spawned after this
    prompts = [p["prompt_ids"] for p in engine_bench.load_prompts(argparse.Namespace(full=False), per_category)]
    prompts = prompts[:n_prompts]
    llm = LLM(speculative_config=spec, disable_log_stats=False,
              worker_extension_cls="vllm_anpd.worker_extension.AnpdWorkerExtension",
              **models.engine_kwargs(max_num_seqs=batch, **extra))
    llm.generate(["Hello, how are you?"], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    if spec:
        llm.collective_rpc("anpd_time_drafter")  # the wall time of each propose call, as the engine pays it
    # The engine benchmark's closed loop (at most `batch` requests in flight), so both measure alike.
    phase = engine_bench.run_phase(llm, {"method": name, "spec": spec, "max_tokens": max_tokens,
                                         "temperature": temperature},
                                   {"prompts": prompts, "batch": batch}, has_drafter=False)
    tokens = sum(len(t) for t in phase["tokens"])
    step_cost = propose_us = None
    if spec and spec["method"] == "anpd":
        step_cost = llm.collective_rpc("anpd_stats")[0].get("step_cost")
    if spec:
        calls = np.array(llm.collective_rpc("anpd_drafter_call_seconds")[0]) * 1e6
        propose_us = {"calls": int(calls.size), "median": float(np.median(calls)), "mean": float(calls.mean()),
                      "p90": float(np.percentile(calls, 90))}
    return dict(step_cost=step_cost, propose_us=propose_us, name=name, batch=batch, prompts=n_prompts,
                per_category=per_category, max_tokens=max_tokens, temperature=temperature,
                elapsed=phase["elapsed"], tokens=tokens,
                mat=tokens / sum(phase["steps"]), tok_s=tokens / phase["elapsed"], counters=phase["counters"])


def check_prompt_set(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a prompt set that cannot give the batch asked for, before any engine starts: the closed loop
    never has more requests in flight than there are prompts (a run of 2026-11-27 asked for batch 64 with
    the default 48 prompts and ran at most 48), and ``--prompts`` beyond the stratified set would silently
    run fewer than recorded."""
    from vllm_anpd import specbench

    if args.batch < 1:
        ap.error(f"--batch {args.batch}: must be >= 1")
    if args.per_category < 1:
        ap.error(f"--per-category {args.per_category}: must be >= 1")
    available = len(specbench.stratified(specbench.load_questions(), args.per_category))
    if args.prompts > available:
        ap.error(f"--prompts {args.prompts}: the set has {available} prompts at --per-category "
                 f"{args.per_category}; raise --per-category or lower --prompts")
    if args.prompts < args.batch:
        ap.error(f"--prompts {args.prompts} is below --batch {args.batch}: at most {args.prompts} requests would "
                 f"ever be in flight; pass --prompts {args.batch} or more (the set at --per-category "
                 f"{args.per_category} has {available})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=48,
                    help="how many of the set's prompts, in its order; at least --batch")
    ap.add_argument("--per-category", type=int, default=5, help="Spec-Bench prompts per category")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    ap.add_argument("--temperature", type=engine_bench.temperature_arg, default=0.0,
                    help="0: greedy (default); above 0, sampled with one seed per request")
    # The default is the first comparison this script ran (README: "none vs ANPD with and without drafts");
    # every configuration added since is asked for by name.
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # its arguments come from the parent below, already checked
        print("RESULT " + json.dumps(run_one(args.worker, args.batch, args.prompts, args.per_category,
                                                 args.max_tokens, args.temperature)),
              flush=True)
        return
    check_prompt_set(ap, args)
    from tqdm import tqdm

    import machine  # beside this script

    RESULTS.mkdir(exist_ok=True)
    measured_on = machine.describe()  # the file gathers runs of several machines: tok/s differ 2.5x between two VMs
    runs = []
    # Round i runs the configurations rotated by i: the VM drifts by ~10 % within minutes, and a fixed order
    # charged the drift to whichever configuration came last (BENCHMARKS.md section 4, "Batch 1 again").
    n = len(args.configs)
    jobs = [name for i in range(args.repeats) for name in args.configs[i % n:] + args.configs[:i % n]]
    for name in tqdm(jobs, desc="engine runs"):
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--batch", str(args.batch),
                               "--prompts", str(args.prompts), "--per-category", str(args.per_category),
                               "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature)],
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"run {name!r} failed (exit code {proc.returncode})")
        result = json.loads(lines[-1][len("RESULT "):]) | {"machine": measured_on}
        runs.append(result)
        with open(RESULTS / "batch_ab.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
    # Each round's runs against that round's `none` run: the machine drifts between rounds.
    per_round = len(args.configs)
    base = {i // per_round: r["tok_s"] for i, r in enumerate(runs) if r["name"] == "none"}
    print("| configuration | runs (tok/s) | mean | vs none, per round | vs none | MAT | propose, us per call "
          "(median) |\n"
          "|---|---|---:|---|---:|---:|---|")
    for name in args.configs:
        mine = [(i // per_round, r) for i, r in enumerate(runs) if r["name"] == name]
        values = [r["tok_s"] for _, r in mine]
        mats = [r["mat"] for _, r in mine]
        ratios = [r["tok_s"] / base[k] for k, r in mine] if base else []
        rounds = ", ".join(f"{x:.3f}" for x in ratios) or "-"
        ratio = f"{sum(ratios) / len(ratios):.3f}x" if ratios else "-"
        propose = ", ".join(f"{r['propose_us']['median']:.0f}" for _, r in mine if r.get("propose_us")) or "-"
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {sum(values) / len(values):.1f} | {rounds} | "
              f"{ratio} | {sum(mats) / len(mats):.3f} | {propose} |")


if __name__ == "__main__":
    main()
