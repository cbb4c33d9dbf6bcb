"""Selection headroom: how much MAT would a perfect chooser get from the candidates the n-gram tables hold?

    python benchmarks/headroom.py [--k 8] [--limit 480]

ANPD drafts, at each position, the top successor of the highest level whose key matches (the shared table's
when the request's own tables have nothing). This replays the 480 Spec-Bench references through replay.py's
verification loop (batch 1, fixed k, no stop rule) with the same tables and six choosers:

* ``highest``: that rule (the shared table needs a count of 2), i.e. ANPD without its stop probability;
* ``recent``: the most recent successor of the highest matching own level instead of its most frequent
  (the tables keep both; recency is what a loop or a list being copied would favour);
* ``oracle-top2``: the true next token whenever it is one of the highest own level's two most frequent
  successors (what keeping a second candidate per key could at best add);
* ``oracle-top-or-recent``: the true next token whenever it is the highest own level's most frequent or
  most recent successor (the ceiling of any rule that picks between those two);
* ``oracle-tops``: the true next token whenever it is the top successor of *any* matching level of either
  table (the ceiling of any rule that chooses among levels and tables);
* ``oracle-any``: the true next token whenever any matching key of either table was ever followed by it.

The oracles peek at the reference, so they are ceilings, not drafters; they say where better choosing could
pay and where only more knowledge (a model) could. Pure Python dictionaries, ~10 s per chooser. Writes
``benchmarks/results/headroom.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay import Corpus, load_references, replay  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
N_MIN, N_MAX = 2, 7  # ANPD's default levels
CROSS_MIN_COUNT = 2  # ANPD's default gate of the shared table
CHOOSERS = ("highest", "recent", "oracle-top2", "oracle-top-or-recent", "oracle-tops", "oracle-any")


class Table:
    """Key (tuple of 1..N_MAX-1 tokens) -> successor counts, and the top successor with ANPD's rule
    (highest count, ties to the most recent). Incremental, unlike ``vllm_anpd.core.oracle`` (which recounts
    the whole context per call, too slow for 480 replays), and it exposes every level's candidates, which the
    kernels do not."""

    def __init__(self):
        self.counts: dict[tuple, dict[int, int]] = {}
        self.top: dict[tuple, int] = {}
        self.last: dict[tuple, int] = {}  # most recent successor

    def observe(self, context: list, i: int) -> None:
        token = context[i]
        for m in range(N_MIN - 1, min(N_MAX - 1, i) + 1):
            key = tuple(context[i - m:i])
            successors = self.counts.setdefault(key, {})
            c = successors.get(token, 0) + 1
            successors[token] = c
            self.last[key] = token
            if key not in self.top or c >= successors[self.top[key]]:
                self.top[key] = token

    def matches(self, chain: list, min_count: int = 1):
        """(key, successors, top) of every matching key, highest level first."""
        for m in range(min(N_MAX - 1, len(chain)), N_MIN - 2, -1):
            key = tuple(chain[len(chain) - m:])
            successors = self.counts.get(key)
            if successors and successors[self.top[key]] >= min_count:
                yield key, successors, self.top[key]


class ChooserDrafter:
    """A drafter for ``replay.replay`` that keeps ANPD's tables in dictionaries and drafts with ``chooser``;
    the oracles read the reference continuation from the corpus."""

    def __init__(self, chooser: str, corpus):
        self.name, self.corpus = chooser, corpus
        self.shared = Table()
        self.own: dict[int, Table] = {}
        self.contexts: dict[int, list] = {}  # tokens folded into the request's own table so far

    def propose(self, tokens, num_tokens, active, k):
        drafts = np.zeros((len(active), k), np.int32)
        lens = np.zeros(len(active), np.int32)
        for i in [i for i in self.own if not active[i]]:  # finished: release, as the proposer does
            del self.own[i], self.contexts[i]
        for i in np.flatnonzero(active):
            n = int(num_tokens[i])
            new_request = i not in self.own
            own = self.own.setdefault(i, Table())
            context = self.contexts.setdefault(i, [])
            first = len(context)
            context.extend(tokens[i, first:n].tolist())
            for pos in range(first, n):
                own.observe(context, pos)
                if not new_request:  # generated tokens only (not the prompt's), as ANPD's shared table
                    self.shared.observe(context, pos)
            end = int(self.corpus.prompt_len[i] + self.corpus.out_len[i])
            chain = context[-(N_MAX - 1):]
            for j in range(k):
                truth = int(tokens[i, n + j]) if n + j < end else -1
                token = self.choose(own, chain, truth)
                if token is None:
                    break
                drafts[i, j] = token
                lens[i] += 1
                chain.append(token)
        return drafts, lens

    def choose(self, own: Table, chain: list, truth: int):
        own_matches = list(own.matches(chain))
        shared_matches = list(self.shared.matches(chain, CROSS_MIN_COUNT))
        if self.name == "recent" and own_matches:
            return own.last[own_matches[0][0]]
        elif self.name == "oracle-top-or-recent" and own_matches:
            key, _, top = own_matches[0]
            if truth in (top, own.last[key]):
                return truth
        elif self.name == "oracle-top2" and own_matches:
            successors = own_matches[0][1]
            if truth in sorted(successors, key=successors.get, reverse=True)[:2]:
                return truth
        elif self.name == "oracle-tops":
            if any(top == truth for _, _, top in own_matches + shared_matches):
                return truth
        elif self.name == "oracle-any":
            if any(truth in successors for _, successors, _ in own_matches + shared_matches):
                return truth
        best = own_matches or shared_matches
        return best[0][2] if best else None


def run(chooser: str, corpus, k: int) -> dict:
    res = replay(corpus, ChooserDrafter(chooser, corpus), k, batch=1)
    steps = int(res["steps"].sum())
    return {"chooser": chooser, "k": k, "mat": int(res["produced"].sum()) / steps,
            "drafted_per_step": int(res["drafted"].sum()) / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--limit", type=int, default=0, help="first N references only (0: all)")
    args = ap.parse_args()
    references = load_references()
    if args.limit:
        references = references[:args.limit]
    corpus = Corpus(references)
    rows = [run(chooser, corpus, args.k) for chooser in tqdm(CHOOSERS, desc="choosers")]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "headroom.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    base = rows[0]["mat"]
    lines = [f"| chooser (k = {args.k}, {len(references)} prompts) | MAT | vs highest | drafted/step |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['chooser']} | {r['mat']:.3f} | {r['mat'] / base:.3f}x | {r['drafted_per_step']:.2f} |"
              for r in rows]
    table = "\n".join(lines) + "\n"
    (RESULTS / "headroom.md").write_text(table)
    print(table, end="")
    plot(rows, args.k, len(references), RESULTS / "headroom.png")


def plot(rows: list, k: int, n_prompts: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    names = [r["chooser"] for r in rows]
    values = [r["mat"] for r in rows]
    bars = ax.bar(names, values, color=["tab:blue"] + ["tab:gray"] * (len(rows) - 1))
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylabel("mean accepted tokens per step (MAT)")
    ax.set_xlabel("chooser (oracles peek at the reference: ceilings, not drafters)")
    ax.set_title(f"Selection headroom, Spec-Bench replay, batch 1, k = {k}, {n_prompts} prompts")
    ax.set_ylim(1.0, max(values) * 1.1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

if __name__ == "__main__":
    main()
