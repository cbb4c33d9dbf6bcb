"""End-to-end benchmark on real vLLM engines: no speculation, vLLM ngram, vLLM suffix, ANPD and an oracle
drafter, on the same Spec-Bench prompts, in one run.

    python benchmarks/engine_bench.py                      # default subset: 26 prompts (2 per category)
    python benchmarks/engine_bench.py --full               # all 480 prompts
    python benchmarks/engine_bench.py --methods none anpd --batches 1 --per-category 1
    python benchmarks/engine_bench.py --reuse               # re-run only jobs without a saved raw result

Each method runs in its own engine (a subprocess), one engine at a time; that engine serves the batch sizes in
turn (at most `batch` requests in flight), with the prefix cache and the drafter's cross-request state reset
between them, so each batch size starts as cold as in a fresh engine. Greedy, fixed max_tokens, float32 by
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
from anpd_options import anpd_speculative_options  # noqa: E402

METHODS = ["none", "ngram", "suffix", "anpd", "oracle"]


def temperature_arg(text: str) -> float:
    """``--temperature`` of the benchmarks that sample: 0 (greedy) to 2."""
    value = float(text)
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"--temperature {text}: must be in [0, 2]")
    return value


def sampling_params(count: int, temperature: float, max_tokens: int) -> list:
    """One request's params per prompt: greedy, or sampled with request ``i`` seeded with ``i`` (every sampled
    benchmark and the sampled replay references share this, so their samples are alike)."""
    from vllm import SamplingParams

    return [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=i if temperature > 0 else None)
            for i in range(count)]


def speculative_config(method: str, k: int, args) -> dict | None:
    if method == "none":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": args.ngram_min,
                "prompt_lookup_max": args.ngram_max}
    if method == "suffix":
        return {"method": "suffix", "num_speculative_tokens": k}
    if method == "anpd":
        return {"method": "anpd", "num_speculative_tokens": k, **args.anpd}
    if method == "oracle":
        return {"method": "custom_class", "model": "vllm_anpd.bench.oracle_proposer.OracleProposer",
                "num_speculative_tokens": k}
    raise ValueError(f"method={method!r}: expected one of {METHODS}")


# --- one engine (subprocess) per method -----------------------------------------------------------------

def worker(args) -> None:
    """Runs one method's phases (one per batch size) on one engine, then writes one raw result per phase."""
    from vllm import LLM, SamplingParams

    from vllm_anpd import models
    from vllm_anpd.bench.oracle_proposer import ENV as ORACLE_ENV

    job = json.loads(Path(args.job).read_text())
    phases = job["phases"]
    if job["method"] == "oracle":
        # The oracle reads this file at construction and again at each reset (per phase, below).
        os.environ[ORACLE_ENV] = job["oracle_refs"]
        Path(job["oracle_refs"]).write_text(Path(phases[0]["oracle_refs"]).read_text())
    llm = LLM(speculative_config=job["spec"], disable_log_stats=False,
              worker_extension_cls="vllm_anpd.worker_extension.AnpdWorkerExtension",
              **models.engine_kwargs(max_num_seqs=max(p["batch"] for p in phases), dtype=job["dtype"],
                                     max_model_len=4096))
    has_drafter = any(llm.collective_rpc("anpd_time_drafter"))
    # Warm-up (not measured): compiles kernels, fills caches.
    llm.generate(["Hello, how are you?"], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    results = []
    for phase in phases:
        # Each phase starts as cold as a fresh engine: no prefix cache hits from the previous phase (the
        # prompt sets overlap), no drafter state learned from its requests.
        llm.reset_prefix_cache()
        if job["method"] == "oracle":
            Path(job["oracle_refs"]).write_text(Path(phase["oracle_refs"]).read_text())
        if has_drafter:
            print(f"   reset between phases: {llm.collective_rpc('anpd_reset_drafter')[0]}", file=sys.stderr)
        results.append(run_phase(llm, job, phase, has_drafter))
    Path(args.out).write_text(json.dumps(results))


def run_phase(llm, job, phase, has_drafter) -> dict:
    """At most ``batch`` requests in flight (a new one is added as soon as one finishes), as an engine with
    ``max_num_seqs = batch`` would schedule them."""
    from tqdm import tqdm

    engine = llm.llm_engine
    # Greedy by default (outputs then equal across methods, and are checked). With a temperature, each
    # request has its own seed, but its tokens still depend on the drafts (rejection sampling): equal in
    # distribution only, so they are not compared.
    temperature = job.get("temperature", 0.0)
    prompts, batch = phase["prompts"], phase["batch"]
    params = sampling_params(len(prompts), temperature, job["max_tokens"])
    before = counters(llm)
    drafter_before = drafter_seconds(llm) if has_drafter else 0.0
    steps = [0] * len(prompts)
    tokens = [[] for _ in prompts]
    next_prompt = in_flight = 0
    bar = tqdm(total=len(prompts), desc=f"{job['method']} b={batch}", file=sys.stderr)
    t0 = time.perf_counter()
    while next_prompt < len(prompts) or engine.has_unfinished_requests():
        while in_flight < batch and next_prompt < len(prompts):
            engine.add_request(f"b{batch}-{next_prompt}", {"prompt_token_ids": prompts[next_prompt]},
                               params[next_prompt])
            next_prompt += 1
            in_flight += 1
        for out in engine.step():
            i = int(out.request_id.split("-")[1])
            new = list(out.outputs[0].token_ids)
            if len(new) > len(tokens[i]):
                steps[i] += 1
                tokens[i] = new
            if out.finished:
                in_flight -= 1
                bar.update(1)
    elapsed = time.perf_counter() - t0
    bar.close()
    after = counters(llm)
    result = {
        "method": job["method"], "batch": batch, "spec": job["spec"], "prompts": prompts,
        "elapsed": elapsed, "steps": steps, "tokens": tokens,
        "counters": {k: after.get(k, 0) - before.get(k, 0) for k in after},
        "drafter_seconds": (drafter_seconds(llm) - drafter_before) if has_drafter else 0.0,
    }
    if job["method"] == "anpd":
        result["anpd_stats"] = [s for s in llm.collective_rpc("anpd_stats") if s][0]
    return result


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


def run_method(method, batches, refs_by_batch, reference, args) -> list[dict]:
    """One engine in a subprocess runs METHOD at each of BATCHES in turn; returns one result per batch.
    The oracle drafts REFERENCE[batch], the no-speculation run's output tokens at that batch size."""
    RESULTS.mkdir(exist_ok=True)
    job_path = RESULTS / f".job_{method}.json"
    out_path = RESULTS / f".out_{method}.json"
    phases = []
    for batch in batches:
        refs = refs_by_batch[batch]
        phase = {"batch": batch, "prompts": [r["prompt_ids"] for r in refs]}
        if method == "oracle":
            phase["oracle_refs"] = str(RESULTS / f".oracle_refs_b{batch}.jsonl")
            Path(phase["oracle_refs"]).write_text("".join(
                json.dumps({"prompt_ids": r["prompt_ids"], "output_ids": out}) + "\n"
                for r, out in zip(refs, reference[batch]["tokens"])))
        phases.append(phase)
    job = {"method": method, "dtype": args.dtype, "max_tokens": args.max_tokens,
           "spec": speculative_config(method, args.k, args), "phases": phases,
           "oracle_refs": str(RESULTS / ".oracle_refs.jsonl")}
    job_path.write_text(json.dumps(job))
    cmd = [sys.executable, __file__, "--worker", "--job", str(job_path), "--out", str(out_path)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if not args.verbose else None)
    if proc.returncode != 0 or not out_path.exists():
        return [{"method": method, "batch": b, "error": f"engine exited with {proc.returncode}"} for b in batches]
    results = json.loads(out_path.read_text())
    # Keep each phase's raw result, so an interrupted run still leaves what it measured (and --reuse finds it).
    for res in results:
        (RESULTS / f"engine_job_{method}_b{res['batch']}.json").write_text(json.dumps(res))
    out_path.unlink()
    job_path.unlink()
    return results


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
    ap.add_argument("--anpd", type=anpd_speculative_options, default={},
                    help='extra anpd_* speculative_config options as JSON, e.g. \'{"anpd_n_max": 5}\'')
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
    methods = sorted(args.methods, key=METHODS.index)  # "none" first: the oracle replays its outputs
    refs_by_batch = {b: load_prompts(args, args.per_category if b == 1 else args.per_category_batched)
                     for b in args.batches}
    for batch, refs in refs_by_batch.items():  # the closed loop never has more requests in flight than prompts
        if batch < 1 or batch > len(refs):
            ap.error(f"--batches {batch}: must be between 1 and the {len(refs)} prompts of that batch's set; "
                     f"raise --per-category-batched (or use --full)")
    results, reference = [], {}
    for method in methods:
        todo = []
        for batch in args.batches:
            refs = refs_by_batch[batch]
            saved = RESULTS / f"engine_job_{method}_b{batch}.json"
            if args.reuse and saved.exists():
                res = json.loads(saved.read_text())
                print(f"== {method}, batch {batch}: reusing {saved.name}", flush=True)
                if res.get("prompts") != [r["prompt_ids"] for r in refs]:
                    raise SystemExit(f"{saved.name} was measured on other prompts: delete it or drop --reuse")
                results.append(res)
            elif method == "oracle" and batch not in reference:
                results.append({"method": method, "batch": batch,
                                "error": "the oracle needs the 'none' run of this batch"})
            else:
                todo.append(batch)
        if todo:
            print(f"== {method}, batches {todo}, prompts {[len(refs_by_batch[b]) for b in todo]}", flush=True)
            results += run_method(method, todo, refs_by_batch, reference, args)
        if method == "none":
            reference = {r["batch"]: r for r in results if r["method"] == "none" and "error" not in r}
    for res in results:
        if "error" in res:
            print(f"   {res['method']} b={res['batch']} failed: {res['error']}", flush=True)
        else:
            res["categories"] = [r["category"] for r in refs_by_batch[res["batch"]]]
    results.sort(key=lambda r: (r["batch"], METHODS.index(r["method"])))
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
