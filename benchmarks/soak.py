"""Soak: 1,000 requests through one vLLM engine with ANPD. Checks that ANPD's per-request memory returns to
its baseline (everything it held for finished requests is released), that the cross-request table stays
within its bound, and reports the growth of the processes' RSS.

    python benchmarks/soak.py                       # 1,000 requests, waves of 50, 64 tokens each
    python benchmarks/soak.py --requests 200 --wave 40
    python benchmarks/soak.py --method none         # control: the same load without speculation

Writes benchmarks/results/soak.{json,md,png} (the control: soak_none.{json,md}; the ANPD run's plot and
table then show the control's RSS beside its own).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--wave", type=int, default=50, help="requests per generate() call (and per measurement)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--method", choices=["anpd", "none"], default="anpd",
                    help="none: the control run, same engine and load without speculation (RSS only)")
    args = ap.parse_args()

    from vllm import LLM

    from vllm_anpd import models, specbench
    from vllm_anpd.bench.soak import as_dicts, run_soak

    spec = {"method": "anpd", "num_speculative_tokens": args.k} if args.method == "anpd" else None
    llm = LLM(speculative_config=spec,
              worker_extension_cls="vllm_anpd.worker_extension.AnpdWorkerExtension",
              **models.engine_kwargs(max_num_seqs=args.wave))
    tokenizer = llm.get_tokenizer()
    prompts = [specbench.chat_prompt(tokenizer, q.text) for q in specbench.load_questions()]
    points = run_soak(llm, prompts, args.requests, args.wave, args.max_tokens, progress=True)
    rows = as_dicts(points)
    base, end = rows[0], rows[-1]
    peak_rss = max(r["rss_bytes"] for r in rows)
    summary = {
        "requests": args.requests, "wave": args.wave, "max_tokens": args.max_tokens, "k": args.k,
        "seconds": end["seconds"],
        "request_bytes_baseline": base["request_bytes"], "request_bytes_end": end["request_bytes"],
        "request_bytes_max": max(r["request_bytes"] for r in rows),
        "tracked_requests_end": end["tracked_requests"],
        "cross_request_bytes_end": end["cross_request_bytes"],
        "rss_baseline": base["rss_bytes"], "rss_end": end["rss_bytes"], "rss_peak": peak_rss,
        "rss_growth_after_first_wave": end["rss_bytes"] - rows[1]["rss_bytes"],
        "huge_page_bytes_end": end["huge_page_bytes"],
        "huge_page_bytes_peak": max(r["huge_page_bytes"] for r in rows),
    }
    RESULTS.mkdir(exist_ok=True)
    name = "soak" if args.method == "anpd" else f"soak_{args.method}"
    (RESULTS / f"{name}.json").write_text(json.dumps({"summary": summary, "points": rows}, indent=1))
    mib = 2**20
    md = [f"{args.requests} requests (Spec-Bench first turns, cycled), waves of {args.wave}, {args.max_tokens} tokens, "
          f"method {args.method}, k = {args.k}, {end['seconds']:.0f} s.", "",
          "| after requests | ANPD tracked requests | ANPD per-request MiB | cross-request table MiB | RSS MiB "
          "| of it in huge pages MiB |",
          "|---:|---:|---:|---:|---:|---:|"]
    step = max(1, len(rows) // 10)
    for r in rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else []):
        md.append(f"| {r['requests_done']} | {r['tracked_requests']} | {r['request_bytes'] / mib:.3f} | "
                  f"{r['cross_request_bytes'] / mib:.2f} | {r['rss_bytes'] / mib:.0f} | "
                  f"{r['huge_page_bytes'] / mib:.0f} |")
    md += ["", f"ANPD per-request bytes: {base['request_bytes']:,} at the start, {end['request_bytes']:,} at the end "
           f"(max {summary['request_bytes_max']:,}). RSS: {base['rss_bytes'] / mib:.0f} MiB at the start, "
           f"{end['rss_bytes'] / mib:.0f} MiB at the end, peak {peak_rss / mib:.0f} MiB; growth after the first "
           f"measured wave {summary['rss_growth_after_first_wave'] / mib:+.0f} MiB; in transparent huge pages: "
           f"{summary['huge_page_bytes_end'] / mib:.0f} MiB at the end, peak {summary['huge_page_bytes_peak'] / mib:.0f} MiB."]
    text = "\n".join(md) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
    plot()
    return 0 if end["request_bytes"] == base["request_bytes"] and end["tracked_requests"] <= 1 else 1


def plot():
    """soak.png from soak.json, with the control run's RSS (soak_none.json) beside it when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (RESULTS / "soak.json").exists():
        return
    mib = 2**20
    run = json.loads((RESULTS / "soak.json").read_text())
    rows = run["points"]
    x = [r["requests_done"] for r in rows]
    fig, ax1 = plt.subplots(figsize=(8, 4.5))
    ax1.plot(x, [r["rss_bytes"] / mib for r in rows], "o-", color="tab:blue", label="RSS, engine processes (ANPD)")
    control = RESULTS / "soak_none.json"
    if control.exists():
        crows = json.loads(control.read_text())["points"]
        ax1.plot([r["requests_done"] for r in crows], [r["rss_bytes"] / mib for r in crows], "o--",
                 color="tab:gray", label="RSS, engine processes (no speculation)")
    ax1.set_xlabel("requests completed")
    ax1.set_ylabel("RSS (MiB)")
    ax2 = ax1.twinx()
    ax2.plot(x, [r["request_bytes"] / mib for r in rows], "s-", color="tab:orange", label="ANPD per-request state")
    ax2.plot(x, [r["cross_request_bytes"] / mib for r in rows], "^-", color="tab:green",
             label="ANPD cross-request table (bounded)")
    ax2.set_ylabel("ANPD state (MiB)")
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax1.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax1.legend(lines, labels, loc="center right", fontsize=8)
    ax1.set_title(f"Soak: {run['summary']['requests']} requests through one engine with ANPD")
    ax1.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "soak.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
