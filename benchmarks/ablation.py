"""Ablation of ANPD's components on the replay simulator (all 480 Spec-Bench prompts, real greedy outputs).

    python benchmarks/ablation.py [--k 5 8] [--batch 1 32]

Each row switches components on from the paper's ANPD (fixed k, no gate, no shared table): the adaptive
stop probability, the batch-aware budget, the cross-request table, and the grow/shrink length rule as the
simple alternative. MAT is measured; speedup is modelled with the calibrated step-time model
(benchmarks/results/cost_model.json, from calibrate_cost.py). Writes benchmarks/results/ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from replay import AnpdDrafter, Corpus, GrowShrinkDrafter, load_references, replay, summarize  # noqa: E402

from vllm_anpd.core import AnpdParams  # noqa: E402
from vllm_anpd.core.config import PAPER  # noqa: E402

DEFAULTS = {f: getattr(AnpdParams(), f) for f in PAPER}
VARIANTS = [
    ("paper ANPD (N=5, fixed k)", AnpdDrafter, PAPER),
    ("+ levels n=2..7", AnpdDrafter, {**PAPER, "n_max": DEFAULTS["n_max"]}),
    ("+ grow/shrink length rule", GrowShrinkDrafter, {**PAPER, "n_max": DEFAULTS["n_max"]}),
    ("+ adaptive stop probability", AnpdDrafter,
     {**PAPER, "n_max": DEFAULTS["n_max"], "stop_probability": DEFAULTS["stop_probability"]}),
    ("+ batch-aware budget", AnpdDrafter,
     {**PAPER, "n_max": DEFAULTS["n_max"], "stop_probability": DEFAULTS["stop_probability"],
      "verify_cost": DEFAULTS["verify_cost"]}),
    ("+ cross-request table (= defaults)", AnpdDrafter, DEFAULTS),
    ("defaults without the stop probability and budget", AnpdDrafter,
     {**DEFAULTS, "stop_probability": 0.0, "verify_cost": 0.0}),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[5, 8])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    args = ap.parse_args()
    cost_path = HERE / "results" / "cost_model.json"
    cost_model = json.loads(cost_path.read_text())
    cost = (cost_model["a_seconds"], cost_model["b_seconds_per_token"])
    refs = load_references(256)
    corpus = Corpus(refs)
    rows = []
    for k in args.k:
        for batch in args.batch:
            for name, cls, opts in VARIANTS:
                drafter = cls(AnpdParams(num_speculative_tokens=k, **opts), len(refs))
                res = replay(corpus, drafter, k, batch, cost)
                s = summarize(corpus, res)["overall"]
                rows.append({"k": k, "batch": batch, "variant": name, "mat": s["mat"],
                             "acceptance_rate": s["acceptance_rate"], "drafted_per_step": s["drafted_per_step"],
                             "modelled_speedup": res["modelled_baseline"] / res["modelled_time"]})
                print(f"k={k} batch={batch:2d} {name:50s} MAT {s['mat']:.3f} acc {s['acceptance_rate']:.3f} "
                      f"speedup {rows[-1]['modelled_speedup']:.3f}", flush=True)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ablation.json").write_text(json.dumps({"cost_model": cost, "rows": rows}, indent=1))
    md = ["| k | batch | variant | MAT | acceptance | drafted/step | modelled speedup |", "|---:|---:|---|---:|---:|---:|---:|"]
    md += [f"| {r['k']} | {r['batch']} | {r['variant']} | {r['mat']:.3f} | {r['acceptance_rate']:.3f} | "
           f"{r['drafted_per_step']:.2f} | {r['modelled_speedup']:.3f} |" for r in rows]
    (HERE / "results" / "ablation.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
