"""Proposer cost per engine step: ANPD (update + draft) versus vLLM's ``NgramProposer.propose``.

    python benchmarks/step_cost.py [--contexts 1024 4096 16384 32768] [--batches 1 16 64 256] [--steps 50] [--repeats 3]
    python benchmarks/step_cost.py --anpd '{"cross_request_entries": 0}' --out step_cost_no_shared
    python benchmarks/step_cost.py --context-pairs 12 --turn-steps 10 --out step_cost_context_pairs
    python benchmarks/step_cost.py --contexts 16384 --batches 64 --evict-mb 128 --max-draft 1 --out step_cost_draft1

Each request's context is real text (Spec-Bench prompts and reference outputs tiled, or the Spec-Bench
prompts alone if the references are not cached). ANPD first folds the context in (not timed, that is prefill); then each
timed step appends two tokens per request (one accepted draft token + the bonus token) and drafts k = 8,
as an engine step does; the cross-request table starts half full of other text (its average in a server
that has run a while). vLLM's ngram proposer rescans the context at every step. The proposers take turns
at every step, on the same contexts, back to back (``--forward-gap-us`` adds a busy pause, a stand-in for
the forward pass): this shared 2-core VM drifts by tens of percent within a minute, and taking turns keeps
that drift out of the ratios. ``--turn-steps N`` makes a turn N steps and leaves each turn's first step
uncounted: each proposer is then measured in its own steady state, not just after the others' work.
``--evict-mb`` reads a buffer before each turn (untimed), as the forward pass between two steps evicts every
cache: each proposer then starts cold, instruction caches and Python's objects included (``--evict-with``:
how, see ``cache_evictor``). The figures are the median microseconds per step of a run, the lowest over
``--repeats`` runs. ``--max-draft N`` caps ANPD's drafts at N tokens per row (0: the tables learn, nothing is
drafted), to split a step's cost between its update and its drafting. Two ANPD figures:

* ``anpd_us``, what delays the engine: ANPD as the vLLM proposer runs it, drafting first and folding the
  step's tokens into its tables on a background thread while the target model runs (here: after the
  timed step, waited for before the next proposer's turn, so that it overlaps nothing measured);
* ``anpd_total_us``, all of its work: the same with the fold done inside the step.

``--context-pairs N`` measures context independence for itself: per batch size, ANPD alone at the smallest
and the largest context, the two alternating N times (same conditions as above), and the median of the N
ratios of each pair. A ratio of two runs a few seconds apart is far less exposed to the drift than the ratio
of two grid points, and a median of many pairs is far less exposed to one bad pair.

Writes ``benchmarks/results/<out>.{json,md,png}`` (``--out`` defaults to ``step_cost``), each naming the
machine (CPU, caches, versions, commit: ``machine.py``) and the text it was measured on.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from anpd_options import anpd_overrides  # noqa: E402
from make_references import reference_path  # noqa: E402

from vllm_anpd.core import AnpdParams, NgramTables  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
K = 8
EVICTORS = ("torch", "numpy")


def cache_evictor(megabytes: int, kind: str = "torch"):
    """A callable that reads ``megabytes`` MB, called untimed before a proposer's step, as the target model's
    forward pass reads its weights between two engine steps (``None`` for 0: steps back to back).

    ``torch`` (the default) sums a torch tensor on torch's threads, as vLLM CPU's forward pass runs: on every
    core (vLLM binds an OpenMP thread to each), over memory from torch's allocator, in ordinary pages (a vLLM
    CPU engine had 14 MiB of ~10 GB in huge pages, BENCHMARKS.md section 7). ``numpy``, what ``--evict-mb``
    did before 2026-11-29, sums a numpy array (numpy advises huge pages for it) on this thread alone; it left
    ANPD's next step 10-20 % dearer than ``torch`` does, and vLLM ngram's as it was (BENCHMARKS.md section 2,
    "A forward pass's stand-in"). Kept to reproduce the figures measured with it.
    """
    if megabytes <= 0:
        return None
    if kind == "numpy":
        return np.ones(megabytes << 17, np.int64).sum
    if kind != "torch":
        raise ValueError(f"evictor {kind!r}: must be one of {EVICTORS}")
    import torch

    return torch.ones(megabytes << 17, dtype=torch.int64).sum


def add_evict_arguments(ap: argparse.ArgumentParser, when: str) -> None:
    """``--evict-mb`` and ``--evict-with``, as ``step_cost.py`` and ``core_ab.py`` both take them."""
    ap.add_argument("--evict-mb", type=int, default=0,
                    help=f"read this many MB before {when}, untimed, as a forward pass evicts the caches (0: off; "
                         "the model's weights are a fair size)")
    ap.add_argument("--evict-with", choices=EVICTORS, default="torch",
                    help="how: a torch tensor summed on every core, as vLLM CPU's forward pass (default), or a "
                         "numpy array on this thread, as before 2026-11-29 (see cache_evictor)")


def evicted_conditions(args) -> str:
    """The conditions line's words for ``--evict-mb`` and ``--evict-with``."""
    how = "torch, every core" if args.evict_with == "torch" else "numpy, one thread"
    return f"caches evicted before each step ({args.evict_mb} MB read, {how})"


def stream_source() -> str:
    """Which text ``base_stream`` tiles (drafts, and so costs, differ a little between the two)."""
    if reference_path(256).exists():
        return "Spec-Bench prompts + reference outputs"
    return "Spec-Bench prompts only (no cached references)"


def provenance() -> dict:
    """Stored with every result: the machine and the text (see ``machine.py``)."""
    return {"machine": machine.describe(), "stream": stream_source()}


def save_results(args, rows, md_lines) -> None:
    """``results/<out>.json`` (arguments, provenance, rows) and ``.md`` (a provenance line, then the table)."""
    RESULTS.mkdir(exist_ok=True)
    info = provenance()
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"args": vars(args), **info, "rows": rows}, indent=1))
    provenance_line = f"Measured on {machine.one_line(info['machine'])}. Text: {info['stream']}.\n\n"
    text = provenance_line + "\n".join(md_lines) + "\n"
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)


@functools.lru_cache(maxsize=1)
def base_stream() -> np.ndarray:
    """Real token streams: prompts + reference outputs if cached, else the Spec-Bench prompts tokenized."""
    path = reference_path(256)
    if path.exists():
        seqs = [json.loads(line) for line in open(path)]
        stream = np.concatenate([np.array(s["prompt_ids"] + s["output_ids"], np.int32) for s in seqs])
    else:
        from transformers import AutoTokenizer

        from vllm_anpd import models, specbench

        tokenizer = AutoTokenizer.from_pretrained(models.default_model_path())
        texts = [specbench.chat_prompt(tokenizer, q.text) for q in specbench.load_questions()]
        stream = np.concatenate([np.array(tokenizer(t, add_special_tokens=False)["input_ids"], np.int32)
                                 for t in texts])
    return stream


def text_stream(length: int) -> np.ndarray:
    stream = base_stream()
    reps = -(-length // len(stream))
    return np.tile(stream, reps)[:length]


def make_batch(context: int, batch: int, steps: int) -> np.ndarray:
    width = context + 2 * steps + 1
    stream = text_stream(width + 997 * batch)
    return np.stack([stream[997 * i: 997 * i + width] for i in range(batch)])


def warm_cross_request_table(tables: NgramTables, chunk: int = 4096) -> None:
    """Fill the shared table to half its bound with other text, as in a server that has run for a while
    (it is cleared when full, so half full is its average): a fresh, nearly empty table fits in the
    cache and would understate the cost of folding every request's tokens into it."""
    if tables.cross_slot < 0:
        return
    bound = tables.params.cross_request_entries
    stream = text_stream(64 * chunk)[::-1].copy()  # reversed: n-grams unlike the requests' own
    slot = tables.acquire()
    row = stream[None, :]
    one = np.zeros(1, np.int32)
    n = 1
    while tables.stats()["cross_request"]["entries"] < bound // 2 and n < stream.size:
        tables.step(row, np.array([n], np.int32), np.array([slot], np.int32), one)
        n = min(n + chunk, stream.size)
    tables.release(slot)


def forward_pass(seconds: float) -> None:
    """Stand-in for the target model's forward pass: the engine thread stays busy (a sleeping thread lets
    this VM's core idle, and the first microseconds after waking run several times slower for any code,
    ANPD's and ngram's alike), and yields the GIL so that a background thread can run meanwhile."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        time.sleep(0)


class AnpdRunner:
    """ANPD on one batch: prefilled at construction (not timed), then one timed step per call. ``core``: a module
    with ``NgramTables`` and ``AnpdParams`` to run instead of the installed core's (``core_ab.py``'s base)."""

    def __init__(self, tokens, context, batch, overrides, background, max_draft=K, core=None):
        tables_class, params_class = (core.NgramTables, core.AnpdParams) if core else (NgramTables, AnpdParams)
        self.tables = tables_class(params_class(num_speculative_tokens=K, **overrides), num_slots=batch,
                                   max_batch=batch, fold_in_background=background)
        warm_cross_request_table(self.tables)
        self.slots = np.array([self.tables.acquire() for _ in range(batch)], np.int32)
        self.max_draft = np.full(batch, max_draft, np.int32)
        self.tokens = tokens
        self.tables.step(tokens, np.full(batch, context, np.int32), self.slots, self.max_draft)  # prefill
        self.tables.settle()

    def step(self, num_tokens) -> float:
        """The step's seconds; its drafts stay in ``self.drafts`` and ``self.lens`` until the next step."""
        t0 = time.perf_counter()
        self.drafts, self.lens = self.tables.step(self.tokens, num_tokens, self.slots, self.max_draft)
        elapsed = time.perf_counter() - t0
        # The background fold: in an engine it runs during the forward pass. Here it is waited for outside
        # the timed region, so that it overlaps nothing that is measured.
        self.tables.settle()
        return elapsed

    def bytes_per_token(self, num_context_tokens) -> float:
        tables = self.tables
        shared = tables.slot_bytes(tables.cross_slot) if tables.cross_slot >= 0 else 0  # not per request
        return (tables.bytes_in_use() - shared) / num_context_tokens


class NgramRunner:
    """vLLM's ``NgramProposer`` on the same batch (prompt_lookup_min 2, max 5, k = 8)."""

    def __init__(self, tokens, batch):
        from vllm.v1.spec_decode.ngram_proposer import NgramProposer

        cfg = SimpleNamespace(
            speculative_config=SimpleNamespace(prompt_lookup_min=2, prompt_lookup_max=5, num_speculative_tokens=K),
            model_config=SimpleNamespace(max_model_len=tokens.shape[1] + K + 1),
            scheduler_config=SimpleNamespace(max_num_seqs=batch),
            parallel_config=SimpleNamespace(tensor_parallel_size=1))
        self.proposer = NgramProposer(cfg)
        self.sampled = [[0]] * batch
        self.tokens = tokens

    def step(self, num_tokens) -> float:
        t0 = time.perf_counter()
        self.proposer.propose(K, self.sampled, num_tokens, self.tokens)
        return time.perf_counter() - t0


def run_point(tokens, context, batch, steps, overrides, gap, with_ngram, evict, turn_steps=1, max_draft=K):
    """One run: ANPD (fold in the background), ANPD (fold in the step) and vLLM ngram take turns, in
    rotating order, on the same contexts; returns each one's median microseconds per step and ANPD's state
    bytes per context token. Taking turns keeps this VM's drift (tens of percent within a minute) out of
    their ratios. A turn is ``turn_steps`` consecutive steps; with more than one, a turn's first step (the
    one that follows the other proposers' work, which has displaced this one's state from the caches) is
    not counted, so each proposer is measured in its own steady state, as in an engine that runs one."""
    runners = {"anpd_us": AnpdRunner(tokens, context, batch, overrides, True, max_draft),
               "anpd_total_us": AnpdRunner(tokens, context, batch, overrides, False, max_draft)}
    if with_ngram:
        runners["vllm_ngram_us"] = NgramRunner(tokens, batch)
    names = list(runners)
    times = {name: [] for name in names}
    for turn, first in enumerate(range(1, steps + 1, turn_steps)):
        for i in range(len(names)):
            name = names[(turn + i) % len(names)]
            for s in range(first, min(first + turn_steps, steps + 1)):
                num_tokens = np.full(batch, context + 2 * s, np.int32)  # an accepted draft token + the bonus
                if evict is not None:
                    evict()  # as a forward pass does: the weights stream through every cache level
                elapsed = runners[name].step(num_tokens)
                if turn_steps == 1 or s > first:
                    times[name].append(elapsed)
                forward_pass(gap)
    result = {name: float(np.median(t) * 1e6) for name, t in times.items()}
    result["anpd_state_bytes_per_token"] = runners["anpd_us"].bytes_per_token(batch * (context + 2 * steps))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3, help="runs per point; the fastest run's median is kept")
    ap.add_argument("--forward-gap-us", type=float, default=0.0,
                    help="busy pause between steps, standing in for the forward pass (0: back to back)")
    add_evict_arguments(ap, "each proposer's turn")
    ap.add_argument("--turn-steps", type=int, default=1,
                    help="consecutive steps per proposer's turn; above 1, each turn's first step is not counted "
                         "(each proposer measured in its own steady state)")
    ap.add_argument("--context-pairs", type=int, default=0,
                    help="instead of the grid: per batch size, N alternating ANPD runs at the smallest and the "
                         "largest context, and the median of their cost ratios")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--max-draft", type=int, default=K,
                    help=f"ANPD drafts at most this many tokens per row (0: its tables learn, nothing is drafted), "
                         f"to split a step's cost between its update and each drafted token (default {K})")
    ap.add_argument("--anpd", type=anpd_overrides, default={},
                    help="JSON of AnpdParams overrides, e.g. '{\"cross_request_entries\": 0}'")
    ap.add_argument("--out", default="step_cost", help="results/<out>.{json,md,png}")
    args = ap.parse_args()
    if args.turn_steps < 1:
        ap.error(f"--turn-steps must be at least 1, got {args.turn_steps}")
    if args.turn_steps > 1 and args.steps < 2:
        ap.error(f"--steps {args.steps} with --turn-steps {args.turn_steps}: no step would be counted "
                 "(each turn's first is not); use --steps 2 or more")
    if not 0 <= args.max_draft <= K:
        ap.error(f"--max-draft must be in [0, {K}], got {args.max_draft}")
    if args.context_pairs < 0:
        ap.error(f"--context-pairs must be 0 (off) or more, got {args.context_pairs}")
    if args.context_pairs and min(args.contexts) == max(args.contexts):
        ap.error(f"--context-pairs compares the smallest and the largest of --contexts, got only {args.contexts}")
    overrides = args.anpd
    if args.context_pairs:
        context_pairs(args, overrides)
        return
    rows = []
    grid = [(c, b) for b in args.batches for c in args.contexts]
    evict = cache_evictor(args.evict_mb, args.evict_with)
    for context, batch in tqdm(grid, desc="step cost"):
        tokens = make_batch(context, batch, args.steps)
        gap = args.forward_gap_us * 1e-6
        runs = [run_point(tokens, context, batch, args.steps, overrides, gap, not args.skip_vllm, evict,
                          args.turn_steps, args.max_draft)
                for _ in range(args.repeats)]
        row = dict(context=context, batch=batch)
        for name in ("anpd_us", "anpd_total_us", "vllm_ngram_us"):
            row[name] = min(r[name] for r in runs) if name in runs[0] else None
        row["anpd_state_bytes_per_token"] = runs[0]["anpd_state_bytes_per_token"]
        rows.append(row)
        del tokens
    md = ["| batch | context | ANPD us/step | ANPD work us/step (fold in the step) | vLLM ngram us/step | "
          "ngram / ANPD | ngram / ANPD work | ANPD state bytes/token |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ng = r["vllm_ngram_us"]
        ratio = f"{ng / r['anpd_us']:.1f}x" if ng else "-"
        ratio_total = f"{ng / r['anpd_total_us']:.1f}x" if ng else "-"
        md.append(f"| {r['batch']} | {r['context']} | {r['anpd_us']:.0f} | {r['anpd_total_us']:.0f} | "
                  f"{f'{ng:.0f}' if ng else '-'} | {ratio} | {ratio_total} | {r['anpd_state_bytes_per_token']:.0f} |")
    save_results(args, rows, md)
    plot(rows, RESULTS / f"{args.out}.png", _conditions(args))


def _conditions(args) -> str:
    conditions = "steps back to back" + (f", {args.turn_steps} per turn" if args.turn_steps > 1 else "")
    if args.evict_mb:
        conditions = evicted_conditions(args)
    if args.max_draft != K:
        conditions += f", ANPD drafts at most {args.max_draft}"
    return conditions


def context_pairs(args, overrides) -> None:
    """Per batch size: ANPD alone at the smallest and the largest context, alternating (which goes first too),
    ``--context-pairs`` times; writes each pair's cost ratio and their median."""
    low, high = min(args.contexts), max(args.contexts)
    evict = cache_evictor(args.evict_mb, args.evict_with)
    rows = []
    for batch in tqdm(args.batches, desc="context pairs"):
        tokens = {c: make_batch(c, batch, args.steps) for c in (low, high)}
        pairs = []
        for i in range(args.context_pairs):
            us = {c: run_point(tokens[c], c, batch, args.steps, overrides, args.forward_gap_us * 1e-6, False, evict,
                               args.turn_steps, args.max_draft)["anpd_us"]
                  for c in ((low, high) if i % 2 == 0 else (high, low))}
            pairs.append((us[low], us[high]))
        ratios = [h / lo for lo, h in pairs]
        rows.append(dict(batch=batch, low_context=low, high_context=high, pairs=pairs, ratios=ratios,
                         median_ratio=float(np.median(ratios)), min_ratio=min(ratios), max_ratio=max(ratios),
                         low_median_us=float(np.median([p[0] for p in pairs])),
                         high_median_us=float(np.median([p[1] for p in pairs]))))
        del tokens
    RESULTS.mkdir(exist_ok=True)
    info = provenance()
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"args": vars(args), **info, "rows": rows}, indent=1))
    md = [f"| batch | ANPD us/step at {low} (median) | at {high} (median) | {high} / {low}: median of the pairs' "
          "ratios | lowest, highest pair |", "|---:|---:|---:|---:|---|"]
    md += [f"| {r['batch']} | {r['low_median_us']:.0f} | {r['high_median_us']:.0f} | {r['median_ratio']:.2f}x | "
           f"{r['min_ratio']:.2f}x, {r['max_ratio']:.2f}x |" for r in rows]
    save_results(args, rows, md)
    plot_pairs(rows, RESULTS / f"{args.out}.png", _conditions(args))


def plot_pairs(rows, path, conditions):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x, r in enumerate(rows):
        ax.plot([x] * len(r["ratios"]), r["ratios"], "o", color="tab:blue", alpha=0.4)
        ax.plot([x - 0.25, x + 0.25], [r["median_ratio"]] * 2, "-", color="tab:blue", linewidth=3)
    ax.axhline(1.5, color="tab:red", linestyle="--", label="target: at most 1.5x")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [str(r["batch"]) for r in rows])
    ax.set_xlabel("batch size")
    low, high = rows[0]["low_context"], rows[0]["high_context"]
    ax.set_ylabel(f"ANPD step cost at {high} / at {low} tokens")
    ax.set_title(f"Context independence: pairs of runs (dots) and their median (bar)\n{conditions}", fontsize=10)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(rows, path, conditions):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    batches = sorted({r["batch"] for r in rows})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(batches)))
    for color, b in zip(colors, batches):
        rs = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["context"])
        ax.plot([r["context"] for r in rs], [r["anpd_us"] for r in rs], "o-", color=color, label=f"ANPD, batch {b}")
        ax.plot([r["context"] for r in rs], [r["anpd_total_us"] for r in rs], "x:", color=color,
                label=f"ANPD, all work (fold in the step), batch {b}")
        if rs[0]["vllm_ngram_us"]:
            ax.plot([r["context"] for r in rs], [r["vllm_ngram_us"] for r in rs], "s--", color=color,
                    label=f"vLLM ngram, batch {b}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("proposer time between forward passes (microseconds)")
    ax.set_title(f"Proposer cost per step: ANPD (incremental tables) vs vLLM ngram (rescan)\n{conditions}",
                 fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
