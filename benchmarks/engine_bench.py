"""End-to-end benchmark on real vLLM engines: no speculation, vLLM ngram, vLLM suffix, ANPD and an oracle
drafter, on the same Spec-Bench prompts, in one run.

    python benchmarks/engine_bench.py                      # default subset: 26 prompts (2 per category)
    python benchmarks/engine_bench.py --full               # all 480 prompts
    python benchmarks/engine_bench.py --methods none anpd --batches 1 --per-category 1
    python benchmarks/engine_bench.py --reuse               # re-run only jobs without a saved raw result

Each (method, batch) runs in its own subprocess, one engine at a time. Greedy, fixed max_tokens, float32 by
default, so outputs can be checked equal across methods. Per request, target forward steps are counted from
the engine's step loop (a step in which the request received tokens), so MAT = output tokens / steps is exact
for every method. Writes benchmarks/results/engine_bench.{json,md} and PNG plots; --update-benchmarks-md
rewrites the marked section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

METHODS = ["none", "ngram", "suffix", "anpd", "oracle"]


def speculative_config(method: str, k: int, args) -> dict | None:
    if method == "none":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": args.ngram_min,
                "prompt_lookup_max": args.ngram_max}
    if method == "suffix":
        return {"method": "suffix", "num_speculative_tokens": k}
    if method == "anpd":
        return {"method": "anpd", "num_speculative_tokens": k, **json.loads(args.anpd)}
    if method == "oracle":
        return {"method": "custom_class", "model": "vllm_anpd.bench.oracle_proposer.OracleProposer",
                "num_speculative_tokens": k}
    raise ValueError(f"method={method!r}: expected one of {METHODS}")


# --- one engine (subprocess) --------------------------------------------------------------------------

def worker(args) -> None:
    from vllm import LLM, SamplingParams

    from vllm_anpd import models

    job = json.loads(Path(args.job).read_text())
    if job["method"] == "oracle":
        os.environ["VLLM_ANPD_ORACLE_REFS"] = job["oracle_refs"]
    llm = LLM(speculative_config=job["spec"], disable_log_stats=False,
              worker_extension_cls="vllm_anpd.worker_extension.AnpdWorkerExtension",
              **models.engine_kwargs(max_num_seqs=job["batch"], dtype=job["dtype"], max_model_len=4096))
    has_drafter = any(llm.collective_rpc("anpd_time_drafter"))
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    # Warm-up (not measured): compiles kernels, fills caches.
    llm.generate(["Hello, how are you?"], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    before = counters(llm)
    drafter_before = drafter_seconds(llm) if has_drafter else 0.0
    prompts = job["prompts"]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    steps = [0] * len(prompts)
    tokens = [[] for _ in prompts]
    from tqdm import tqdm

    bar = tqdm(total=len(prompts), desc=f"{job['method']} b={job['batch']}", file=sys.stderr)
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            i = int(out.request_id)
            new = list(out.outputs[0].token_ids)
            if len(new) > len(tokens[i]):
                steps[i] += 1
                tokens[i] = new
            if out.finished:
                bar.update(1)
    elapsed = time.perf_counter() - t0
    bar.close()
    after = counters(llm)
    result = {
        "method": job["method"], "batch": job["batch"], "spec": job["spec"], "prompts": job["prompts"],
        "elapsed": elapsed, "steps": steps, "tokens": tokens,
        "counters": {k: after.get(k, 0) - before.get(k, 0) for k in after},
        "drafter_seconds": (drafter_seconds(llm) - drafter_before) if has_drafter else 0.0,
    }
    if job["method"] == "anpd":
        result["anpd_stats"] = [s for s in llm.collective_rpc("anpd_stats") if s][0]
    Path(args.out).write_text(json.dumps(result))


def counters(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode") and hasattr(m, "value"):
            out[m.name] = out.get(m.name, 0) + m.value
    return out


def drafter_seconds(llm) -> float:
    return float(sum(s or 0.0 for s in llm.collective_rpc("anpd_drafter_seconds")))


# --- the driver ---------------------------------------------------------------------------------------

def load_prompts(args, per_category):
    """Spec-Bench first turns in the model's chat template, as token ids: ``per_category`` of each category
    (file order), or all 480 with ``--full``."""
    from transformers import AutoTokenizer

    from vllm_anpd import models, specbench

    tokenizer = AutoTokenizer.from_pretrained(models.default_model_path())
    questions = specbench.load_questions()
    if not args.full:
        questions = specbench.stratified(questions, per_category)
    return [{"category": q.category, "question_id": q.question_id,
             "prompt_ids": tokenizer(specbench.chat_prompt(tokenizer, q.text), add_special_tokens=False)["input_ids"]}
            for q in questions]


def run_job(method, batch, refs, args, reference=None) -> dict:
    """One engine in a subprocess. The oracle drafts REFERENCE, the no-speculation run's output tokens."""
    RESULTS.mkdir(exist_ok=True)
    tag = f"{method}_b{batch}"
    job_path = RESULTS / f".job_{tag}.json"
    out_path = RESULTS / f".out_{tag}.json"
    oracle_refs = RESULTS / ".oracle_refs.jsonl"
    if method == "oracle":
        if reference is None:
            return {"method": method, "batch": batch, "error": "the oracle needs the 'none' run of this batch"}
        oracle_refs.write_text("".join(json.dumps({"prompt_ids": r["prompt_ids"], "output_ids": out}) + "\n"
                                       for r, out in zip(refs, reference["tokens"])))
    job = {"method": method, "batch": batch, "dtype": args.dtype, "max_tokens": args.max_tokens,
           "spec": speculative_config(method, args.k, args), "prompts": [r["prompt_ids"] for r in refs],
           "oracle_refs": str(oracle_refs)}
    job_path.write_text(json.dumps(job))
    cmd = [sys.executable, __file__, "--worker", "--job", str(job_path), "--out", str(out_path)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if not args.verbose else None)
    if proc.returncode != 0 or not out_path.exists():
        return {"method": method, "batch": batch, "error": f"engine exited with {proc.returncode}"}
    result = json.loads(out_path.read_text())
    # Keep each job's raw result, so an interrupted run still leaves what it measured.
    out_path.replace(RESULTS / f"engine_job_{tag}.json")
    job_path.unlink()
    return result


def summarize(results):
    cats = sorted({c for res in results if "error" not in res for c in res["categories"]})
    table = {}
    for res in results:
        if "error" in res:
            continue
        key = f"{res['method']} b={res['batch']}"
        row = {}
        for c in cats + ["overall"]:
            idx = [i for i, rc in enumerate(res["categories"]) if c == "overall" or rc == c]
            out = sum(len(res["tokens"][i]) for i in idx)
            st = sum(res["steps"][i] for i in idx)
            row[c] = out / st if st else 0.0
        total_out = sum(len(t) for t in res["tokens"])
        cnt = res["counters"]
        drafted = cnt.get("vllm:spec_decode_num_draft_tokens", 0)
        accepted = cnt.get("vllm:spec_decode_num_accepted_tokens", 0)
        table[key] = {"method": res["method"], "batch": res["batch"], "prompts": len(res["tokens"]), "mat": row,
                      "tok_per_s": total_out / res["elapsed"], "elapsed": res["elapsed"],
                      "acceptance_rate": accepted / drafted if drafted else None,
                      "proposer_share": res["drafter_seconds"] / res["elapsed"]}
    for key, row in table.items():
        base = table.get(f"none b={row['batch']}")
        row["speedup"] = row["tok_per_s"] / base["tok_per_s"] if base else None
    # Exactness: every method's tokens against no speculation at the same batch size.
    by_key = {f"{r['method']} b={r['batch']}": r for r in results if "error" not in r}
    for key, row in table.items():
        base = by_key.get(f"none b={row['batch']}")
        if base:
            diff = [i for i, (a, b) in enumerate(zip(by_key[key]["tokens"], base["tokens"])) if a != b]
            row["outputs_differ"] = len(diff)
    return cats, table


def markdown(cats, table, args) -> str:
    lines = [f"Spec-Bench first turns ({'all 480' if args.full else f'{args.per_category} per category at batch 1, {args.per_category_batched} per category at larger batches'}),"
             f" k = {args.k}, max_tokens = {args.max_tokens}, {args.dtype}, greedy. vLLM CPU 0.32.0, SmolLM2-135M-Instruct.",
             "", "| method | batch | prompts | MAT | accept rate | tok/s | speedup vs none | proposer share | outputs != none |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in table.items():
        acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "-"
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"| {r['method']} | {r['batch']} | {r['prompts']} | {r['mat']['overall']:.2f} | {acc} | {r['tok_per_s']:.1f} | "
                     f"{sp} | {100 * r['proposer_share']:.1f}% | {r.get('outputs_differ', '-')} |")
    lines += ["", "MAT per category (batch 1 runs if present):", "",
              "| method | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
    shown = [k for k in table if table[k]["batch"] == min(t["batch"] for t in table.values())]
    for key in shown:
        lines.append(f"| {table[key]['method']} | " + " | ".join(f"{table[key]['mat'][c]:.2f}" for c in cats) + " |")
    return "\n".join(lines) + "\n"


def plots(cats, table) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    batch = min(t["batch"] for t in table.values())
    keys = [k for k in table if table[k]["batch"] == batch]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / max(1, len(keys))
    x = np.arange(len(cats) + 1)
    for j, key in enumerate(keys):
        vals = [table[key]["mat"][c] for c in cats + ["overall"]]
        ax.bar(x + j * width, vals, width, label=table[key]["method"])
    ax.set_xticks(x + width * (len(keys) - 1) / 2, cats + ["overall"], rotation=30, ha="right")
    ax.set_ylabel("mean accepted tokens per target step (MAT)")
    ax.set_title(f"MAT per Spec-Bench category (batch {batch})")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "engine_mat_by_category.png", dpi=120)

    fig, ax = plt.subplots(figsize=(8, 5))
    methods = [m for m in METHODS if any(t["method"] == m for t in table.values())]
    batches = sorted({t["batch"] for t in table.values()})
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        vals = [table.get(f"{m} b={b}", {}).get("speedup") or 0 for b in batches]
        ax.bar(np.arange(len(batches)) + j * width, vals, width, label=m)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xticks(np.arange(len(batches)) + width * (len(methods) - 1) / 2, [f"batch {b}" for b in batches])
    ax.set_ylabel("output tok/s relative to no speculation")
    ax.set_title("Speedup over no speculation, by batch size")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "engine_speedup_by_batch.png", dpi=120)


def update_benchmarks_md(text: str) -> None:
    path = HERE.parent / "BENCHMARKS.md"
    begin, end = "<!-- engine_bench:begin -->", "<!-- engine_bench:end -->"
    doc = path.read_text()
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin) + len(begin)] + "\n" + text + doc[doc.index(end):]
        path.write_text(doc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--per-category", type=int, default=2, help="prompts per category at batch 1")
    ap.add_argument("--per-category-batched", type=int, default=5, help="prompts per category at batch > 1")
    ap.add_argument("--full", action="store_true", help="all 480 Spec-Bench prompts")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ngram-min", type=int, default=2, help="vLLM ngram prompt_lookup_min")
    ap.add_argument("--ngram-max", type=int, default=4, help="vLLM ngram prompt_lookup_max")
    ap.add_argument("--anpd", default="{}", help="extra anpd_* options as JSON")
    ap.add_argument("--reuse", action="store_true",
                    help="load a job's saved raw result (results/engine_job_<method>_b<batch>.json) instead of "
                         "running it again; delete a file to re-run that job")
    ap.add_argument("--update-benchmarks-md", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    results = []
    methods = sorted(args.methods, key=METHODS.index)  # "none" first: the oracle replays its outputs
    for batch in args.batches:
        refs = load_prompts(args, args.per_category if batch == 1 else args.per_category_batched)
        reference = None
        for method in methods:
            saved = RESULTS / f"engine_job_{method}_b{batch}.json"
            if args.reuse and saved.exists():
                res = json.loads(saved.read_text())
                print(f"== {method}, batch {batch}: reusing {saved.name}", flush=True)
                if res.get("prompts") != [r["prompt_ids"] for r in refs]:
                    raise SystemExit(f"{saved.name} was measured on other prompts: delete it or drop --reuse")
            else:
                print(f"== {method}, batch {batch}, {len(refs)} prompts", flush=True)
                res = run_job(method, batch, refs, args, reference)
            res["categories"] = [r["category"] for r in refs]
            if method == "none" and "error" not in res:
                reference = res
            if "error" in res:
                print(f"   {method} failed: {res['error']}", flush=True)
            results.append(res)
    cats, table = summarize(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_bench.json").write_text(json.dumps({"args": vars(args), "table": table,
                                                           "errors": [r for r in results if "error" in r]},
                                                          indent=1))
    text = markdown(cats, table, args)
    (RESULTS / "engine_bench.md").write_text(text)
    print(text)
    plots(cats, table)
    if args.update_benchmarks_md:
        update_benchmarks_md(text)


if __name__ == "__main__":
    main()
