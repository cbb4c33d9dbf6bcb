"""Calibrates the target's step-time model ``a + b x tokens`` on this machine (no speculation).

    python benchmarks/calibrate_cost.py [--batches 1 2 4 8 16 32 48] [--steps 48]
    python benchmarks/calibrate_cost.py --drafts [--batches 1 8 32] [--schedule 0 1 2 3 5]

``--drafts`` measures what a step costs as a function of the draft tokens it verifies: one engine whose
proposer (``vllm_anpd.bench.fixed_length_proposer``) drafts the lengths of ``--schedule`` in turn, one per
step, all rejected, so every draft length is timed interleaved with the others (no drift between runs).
Writes benchmarks/results/cost_drafts.json and prints median step time per (batch, draft length).

Decodes B requests at a time (ignore_eos, fixed length) and times engine steps: each step scores B tokens.
A least-squares line through (B, median step time) gives ``a`` (fixed cost per step) and ``b`` (cost per
scored token). ``verify_cost = b / a`` is ANPD's ``anpd_verify_cost``: what one more draft token costs,
relative to a step. Writes benchmarks/results/cost_model.json and prints the fit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def calibrate_drafts(args) -> None:
    import os

    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from vllm_anpd import models

    schedule = args.schedule
    os.environ["VLLM_ANPD_DRAFT_SCHEDULE"] = ",".join(map(str, schedule))
    spec = {"method": "custom_class", "model": "vllm_anpd.bench.fixed_length_proposer.FixedLengthProposer",
            "num_speculative_tokens": max(schedule)}
    llm = LLM(speculative_config=spec, **models.engine_kwargs(max_num_seqs=max(args.batches), dtype=args.dtype))
    engine = llm.llm_engine
    prompt = "Write a long story about a lighthouse keeper and the sea."
    steps = args.steps * len(schedule)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4 * len(schedule)), use_tqdm=False)

    rows = []
    for b in tqdm(args.batches, desc="batch sizes"):
        for i in range(b):
            engine.add_request(f"{b}-{i}", prompt, params)
        by_length = {d: [] for d in schedule}
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            if not outs or len(outs) != b or any(o.finished for o in outs):
                continue
            # This step verified the drafts made when each request held one token less (all drafts are
            # rejected: one new token per step); the proposer gave every row the length its schedule holds
            # for the longest of those contexts.
            if all(len(o.outputs[0].token_ids) >= 2 for o in outs):
                longest = max(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs)
                by_length[schedule[longest % len(schedule)]].append(dt)
        for d in schedule:
            rows.append({"batch": b, "draft_len": d, "median_step_s": float(np.median(by_length[d])),
                         "steps": len(by_length[d])})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cost_drafts.json").write_text(json.dumps({"dtype": args.dtype, "schedule": schedule,
                                                           "rows": rows}, indent=1))
    for b in args.batches:
        base = next(r["median_step_s"] for r in rows if r["batch"] == b and r["draft_len"] == 0)
        cells = ", ".join(f"d={r['draft_len']}: {1000 * r['median_step_s']:.1f} ms ({r['median_step_s'] / base:.2f}x)"
                          for r in rows if r["batch"] == b)
        print(f"batch {b:3d}: {cells}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--drafts", action="store_true", help="step time per draft length (see above)")
    ap.add_argument("--schedule", type=int, nargs="+", default=[0, 1, 2, 3, 5])
    args = ap.parse_args()
    if args.drafts:
        args.batches = args.batches or [1, 8, 32]
        args.steps = min(args.steps, 24)
        return calibrate_drafts(args)
    args.batches = args.batches or [1, 2, 4, 8, 16, 32, 48]
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from vllm_anpd import models

    llm = LLM(**models.engine_kwargs(max_num_seqs=max(args.batches), dtype=args.dtype))
    engine = llm.llm_engine
    prompt = "Write a long story about a lighthouse keeper and the sea."
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 8, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up
    rows = []
    for b in tqdm(args.batches, desc="batch sizes"):
        for i in range(b):
            engine.add_request(f"{b}-{i}", prompt, params)
        times = []
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            # Decode steps only: all b requests running, each scoring one token.
            if outs and len(outs) == b and all(len(o.outputs[0].token_ids) > 1 for o in outs):
                times.append(dt)
        rows.append({"batch": b, "median_step_s": float(np.median(times)), "steps": len(times)})
    x = np.array([r["batch"] for r in rows], float)
    y = np.array([r["median_step_s"] for r in rows], float)
    b_, a_ = np.polyfit(x, y, 1)
    result = {"a_seconds": float(a_), "b_seconds_per_token": float(b_), "verify_cost": float(b_ / a_),
              "dtype": args.dtype, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cost_model.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"batch {r['batch']:3d}: {1000 * r['median_step_s']:.1f} ms/step")
    print(f"step time = {1000 * a_:.2f} ms + {1000 * b_:.3f} ms x tokens; verify_cost = b/a = {b_ / a_:.3f}")


if __name__ == "__main__":
    main()
