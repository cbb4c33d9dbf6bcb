"""Replay simulator: drafting quality on real greedy outputs, in seconds, without an engine.

    python benchmarks/make_references.py            # once: vLLM, no speculation, real model (cached)
    python benchmarks/replay.py --k 5 8              # ANPD vs vLLM ngram (grid + its default) on 480 prompts

For each request, decoding is replayed exactly as vLLM verifies drafts: the prefill step yields the first
output token; then every step proposes a draft from prompt + output so far, accepts the longest prefix
equal to the reference continuation, plus one token of the target's own (the bonus / correction token),
never past the reference's end. MAT = output tokens / target forward steps (prefill included).
vLLM's own ``NgramProposer`` (imported from the installed vLLM) runs on the identical arrays.

``--temperature T`` replays sampled outputs (``make_references.py --temperature T``) instead: exact in
distribution for sampled requests (see make_references.py), so one set of samples serves every drafter.

Writes ``benchmarks/results/replay.json`` and ``replay.md`` (per category), prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anpd_options import anpd_overrides  # noqa: E402
from engine_bench import temperature_arg  # noqa: E402
from make_references import reference_path  # noqa: E402

from vllm_anpd.core import AnpdParams, BatchBudget, NgramTables  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load_references(max_tokens: int = 256, temperature: float = 0.0):
    path = reference_path(max_tokens, temperature)
    if not path.exists():
        sampled = f" --temperature {temperature:g}" if temperature else ""
        raise SystemExit(f"{path} missing: run  python benchmarks/make_references.py --max-tokens {max_tokens}"
                         f"{sampled}")
    return [json.loads(line) for line in open(path)]


class Corpus:
    """All requests as one token matrix (prompt + reference output per row)."""

    def __init__(self, refs):
        self.refs = refs
        self.prompt_len = np.array([len(r["prompt_ids"]) for r in refs], np.int64)
        self.out_len = np.array([len(r["output_ids"]) for r in refs], np.int64)
        width = int((self.prompt_len + self.out_len).max()) + 1
        self.tokens = np.zeros((len(refs), width), np.int32)
        for i, r in enumerate(refs):
            seq = r["prompt_ids"] + r["output_ids"]
            self.tokens[i, :len(seq)] = seq
        self.categories = [r["category"] for r in refs]


class AnpdDrafter:
    name = "anpd"

    def __init__(self, params: AnpdParams, num_requests: int):
        self.params = params
        self.tables = NgramTables(params, num_slots=num_requests, max_batch=num_requests)
        self.slot_ids = np.array([self.tables.acquire() for _ in range(num_requests)], np.int32)
        self.live = np.zeros(num_requests, bool)
        self.budget = BatchBudget(params)

    def release_finished(self, active):
        """Release the slots of requests that finished since the last call, as the vLLM proposer does."""
        for i in np.flatnonzero(self.live & ~active):
            self.tables.release(int(self.slot_ids[i]))
        self.live = active.copy()

    def propose(self, tokens, num_tokens, active, k):
        self.release_finished(active)
        slots = np.where(active, self.slot_ids, -1).astype(np.int32)
        stop = self.budget.stop_probability(int(active.sum()), self.tables)
        drafts, lens = self.tables.step(tokens, num_tokens, slots, np.full(len(slots), k, np.int32), stop)
        self.budget.drafted(int(lens.sum()))
        return drafts, lens

    def extra_stats(self):
        return self.tables.stats()


class GrowShrinkDrafter(AnpdDrafter):
    """ANPD's tables with the simple per-request length rule instead of ANPD's stop probability: the limit
    grows by one after a fully accepted draft and drops to (accepted + 1) after a miss. Ablation baseline."""

    name = "anpd-growshrink"

    def __init__(self, params, num_requests):
        super().__init__(params.replace(stop_probability=0.0, verify_cost=0.0), num_requests)
        self.limit = np.full(num_requests, 2, np.int32)
        self.prev = {}  # request -> (num_tokens, draft)

    def propose(self, tokens, num_tokens, active, k):
        self.release_finished(active)
        for i in np.flatnonzero(active):
            if i in self.prev:
                n0, draft = self.prev[i]
                got = tokens[i, n0:num_tokens[i] - 1]  # accepted draft tokens (the last one is the bonus)
                acc = 0
                while acc < len(draft) and acc < len(got) and got[acc] == draft[acc]:
                    acc += 1
                if len(draft):
                    self.limit[i] = min(self.limit[i] + 1, k) if acc == len(draft) else max(acc + 1, 1)
        slots = np.where(active, self.slot_ids, -1).astype(np.int32)
        drafts, lens = self.tables.step(tokens, num_tokens, slots, self.limit)
        for i in np.flatnonzero(active):
            self.prev[i] = (num_tokens[i], drafts[i, :lens[i]].copy())
        return drafts, lens


class VllmNgramDrafter:
    """vLLM's built-in n-gram proposer, from the installed vLLM, driven with the same arrays."""

    def __init__(self, min_n: int, max_n: int, k: int, num_requests: int, max_model_len: int):
        from vllm.v1.spec_decode.ngram_proposer import NgramProposer

        self.name = f"ngram[{min_n},{max_n}]"
        cfg = SimpleNamespace(
            speculative_config=SimpleNamespace(prompt_lookup_min=min_n, prompt_lookup_max=max_n,
                                               num_speculative_tokens=k),
            model_config=SimpleNamespace(max_model_len=max_model_len),
            scheduler_config=SimpleNamespace(max_num_seqs=num_requests),
            parallel_config=SimpleNamespace(tensor_parallel_size=1))
        self.proposer = NgramProposer(cfg)
        self.k = k

    def propose(self, tokens, num_tokens, active, k):
        sampled = [[0] if a else [] for a in active]
        drafts = self.proposer.propose(k, sampled, num_tokens.astype(np.int32), tokens)
        lens = np.array([len(d) for d in drafts], np.int32)
        out = np.zeros((len(drafts), max(1, k)), np.int32)
        for i, d in enumerate(drafts):
            out[i, :len(d)] = d
        return out, lens

    def extra_stats(self):
        return {}


class SuffixDrafter:
    """vLLM's ``suffix`` method (Arctic Inference's SuffixDecodingCache), driven as vLLM's
    ``SuffixDecodingProposer`` drives it, with vLLM's default settings."""

    name = "suffix"

    def __init__(self, k: int, corpus: "Corpus", max_tree_depth=24, max_spec_factor=1.0, min_token_prob=0.1):
        from arctic_inference.suffix_decoding import SuffixDecodingCache

        self.cache = SuffixDecodingCache(max_tree_depth=max_tree_depth, max_cached_requests=10000)
        self.corpus = corpus
        self.depth, self.factor, self.min_prob = max_tree_depth, max_spec_factor, min_token_prob
        self.seen = {}  # request -> tokens already given to the cache

    def propose(self, tokens, num_tokens, active, k):
        out = np.zeros((len(active), k), np.int32)
        lens = np.zeros(len(active), np.int32)
        for i in np.flatnonzero(active):
            rid = str(i)
            n = int(num_tokens[i])
            p = int(self.corpus.prompt_len[i])
            if rid not in self.seen:
                self.cache.start_request(rid, tokens[i, :p].tolist())
                self.seen[rid] = p
            if n > self.seen[rid]:
                self.cache.add_active_response(rid, tokens[i, self.seen[rid]:n].tolist())
                self.seen[rid] = n
            pattern = tokens[i, max(0, n - self.depth):n].tolist()
            d = self.cache.speculate(rid, pattern, max_spec_tokens=k, max_spec_factor=self.factor,
                                     min_token_prob=self.min_prob).token_ids
            lens[i] = len(d)
            out[i, :len(d)] = d
        for rid in [r for r in self.seen if r in self.cache.active_requests and not active[int(r)]]:
            self.cache.stop_request(rid)
        return out, lens

    def extra_stats(self):
        return {}


def replay(corpus: Corpus, drafter, k: int, batch: int = 0, cost=(1.0, 0.0)):
    """Replays all requests with continuous batching (``batch`` concurrent, 0 = all at once), one drafter
    call per engine step. ``cost = (a, b)`` models the target's step time as ``a + b x tokens``: the modelled
    time with speculation and without it (one token per request per step) give a modelled speedup."""
    n = len(corpus.refs)
    batch = batch or n
    produced = np.minimum(1, corpus.out_len)  # the prefill step samples the first output token
    steps = np.ones(n, np.int64)
    drafted = np.zeros(n, np.int64)
    accepted = np.zeros(n, np.int64)
    admitted = np.zeros(n, bool)
    a, b = cost
    modelled_time = 0.0
    t0 = time.perf_counter()
    while True:
        # Continuous batching: waiting requests join, in order, whenever fewer than `batch` are unfinished.
        # A request whose whole output is its prefill's token finishes on joining and frees its place at
        # once, as in baseline_time (else the two would model different batch sizes).
        active = admitted & (produced < corpus.out_len)
        waiting = np.flatnonzero(~admitted)
        room = batch - int(active.sum())
        if room > 0 and len(waiting):
            admitted[waiting[:room]] = True
            continue
        if not active.any():
            break
        num_tokens = corpus.prompt_len + produced
        drafts, lens = drafter.propose(corpus.tokens, num_tokens, active, k)
        idx = np.flatnonzero(active)
        modelled_time += a + b * (len(idx) + int(lens[idx].sum()))
        for i in idx:
            d = lens[i]
            start = num_tokens[i]
            ref = corpus.tokens[i, start:start + d]
            match = 0
            while match < d and drafts[i, match] == ref[match]:
                match += 1
            match = min(match, corpus.out_len[i] - produced[i] - 1)
            drafted[i] += d
            accepted[i] += match
            produced[i] += match + 1
            steps[i] += 1
    return dict(produced=produced, steps=steps, drafted=drafted, accepted=accepted,
                seconds=time.perf_counter() - t0, modelled_time=modelled_time,
                modelled_baseline=baseline_time(corpus, batch, cost))


def baseline_time(corpus: Corpus, batch: int, cost) -> float:
    """Modelled time without speculation: one token per request per step, same continuous batching."""
    remaining = list(np.maximum(corpus.out_len - 1, 0))
    a, b = cost
    total, active, nxt = 0.0, [], 0
    while True:
        while len(active) < batch and nxt < len(remaining):
            if remaining[nxt] > 0:
                active.append(remaining[nxt])
            nxt += 1
        if not active:
            return total
        step = min(active)  # steps until the next request finishes: batch size is constant meanwhile
        total += step * (a + b * len(active))
        active = [r - step for r in active if r > step]


def summarize(corpus: Corpus, res) -> dict:
    by_cat = defaultdict(list)
    for i, c in enumerate(corpus.categories):
        by_cat[c].append(i)
    by_cat["overall"] = list(range(len(corpus.categories)))

    def agg(idx):
        prod, steps = res["produced"][idx].sum(), res["steps"][idx].sum()
        dr, ac = res["drafted"][idx].sum(), res["accepted"][idx].sum()
        return {"mat": float(prod / steps), "acceptance_rate": float(ac / dr) if dr else 0.0,
                "drafted_per_step": float(dr / steps), "output_tokens": int(prod), "steps": int(steps)}

    return {c: agg(idx) for c, idx in sorted(by_cat.items())}


def run_one(corpus, drafter, k, batch, cost):
    res = replay(corpus, drafter, k, batch, cost)
    out = {"summary": summarize(corpus, res), "stats": drafter.extra_stats(), "replay_seconds": res["seconds"],
           "modelled_speedup": res["modelled_baseline"] / res["modelled_time"]}
    s = out["summary"]["overall"]
    print(f"k={k} batch={batch or 'all'} {drafter.name:14s} MAT {s['mat']:.3f}  acc {s['acceptance_rate']:.3f}  "
          f"drafted/step {s['drafted_per_step']:.2f}  modelled speedup {out['modelled_speedup']:.3f}  "
          f"({res['seconds']:.1f}s)", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[5, 8])
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="concurrent requests (continuous batching)")
    ap.add_argument("--cost", type=float, nargs=2, default=[1.0, 0.0], metavar=("A", "B"),
                    help="target step time model a + b x tokens (benchmarks/results/cost_model.json)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--temperature", type=temperature_arg, default=0.0,
                    help="replay sampled references (make_references.py --temperature T) instead of greedy ones")
    ap.add_argument("--anpd", type=anpd_overrides, default={}, help="JSON of AnpdParams overrides")
    ap.add_argument("--no-ngram", action="store_true", help="skip vLLM's ngram grid")
    ap.add_argument("--no-suffix", action="store_true", help="skip vLLM's suffix method")
    ap.add_argument("--out", type=str, default="replay")
    args = ap.parse_args()
    refs = load_references(args.max_tokens, args.temperature)
    if args.limit:
        refs = refs[: args.limit]
    corpus = Corpus(refs)
    overrides = args.anpd
    results = {}
    for k in args.k:
        for batch in args.batch:
            anpd = AnpdDrafter(AnpdParams(num_speculative_tokens=k, **overrides), len(refs))
            results[f"k={k} b={batch} anpd"] = run_one(corpus, anpd, k, batch, args.cost)
            if not args.no_suffix:
                try:
                    results[f"k={k} b={batch} suffix"] = run_one(corpus, SuffixDrafter(k, corpus), k, batch, args.cost)
                except ImportError:
                    print("arctic-inference not installed: suffix skipped (VLLM_ANPD_SUFFIX=1 bash scripts/install.sh)")
            if args.no_ngram:
                continue
            # issue 2's grid, then vLLM's default (SpeculativeConfig sets min = max = 5 when neither is given):
            # what a user who writes {"method": "ngram"} gets.
            for lo, hi in [(lo, hi) for lo in (1, 2, 3) for hi in (3, 4, 5)] + [(5, 5)]:
                d = VllmNgramDrafter(lo, hi, k, len(refs), corpus.tokens.shape[1] + k + 2)
                results[f"k={k} b={batch} {d.name}"] = run_one(corpus, d, k, batch, args.cost)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(markdown(results))
    (RESULTS / f"{args.out}.md").write_text(markdown(results))


def markdown(results) -> str:
    cats = sorted(next(iter(results.values()))["summary"].keys(), key=lambda c: (c == "overall", c))
    lines = ["| run | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['summary'][c]['mat']:.3f}" for c in cats) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
