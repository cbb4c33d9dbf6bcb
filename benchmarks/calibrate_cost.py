"""Calibrates the target's step-time model ``a + b x tokens`` on this machine (no speculation).

    python benchmarks/calibrate_cost.py [--batches 1 2 4 8 16 32 48] [--steps 48]

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 48])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
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
