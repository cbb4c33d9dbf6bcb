"""Selection headroom: how much MAT would a perfect chooser get from the candidates the n-gram tables hold?

    python benchmarks/headroom.py [--k 8] [--limit 480] [--cost A B]

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

And two ceilings of *stopping*, each a chooser above with a perfect stop rule (the draft ends just before
its first wrong token, so no draft token is ever rejected):

* ``highest+oracle-stop``: ``highest``'s drafts, cut perfectly (the ceiling of any stop rule or adaptive
  length over ANPD's candidates: the MAT of drafting to k, the verification cost of drafting nothing wrong);
* ``oracle-tops+oracle-stop``: ``oracle-tops``, cut perfectly (perfect choosing and perfect stopping).

For reference, ANPD itself (the kernels, shipped defaults: stop probability and batch budget) and vLLM's
``suffix`` (when arctic-inference is installed) run in the same replay. Every row gets a modelled speedup:
the replayed steps priced with the step-time model ``a + b x tokens`` (``--cost``, by default this
machine's calibration, section 5 of BENCHMARKS.md), against the same decoding without speculation.

The oracles peek at the reference, so they are ceilings, not drafters; they say where better choosing could
pay and where only more knowledge (a model) could. Pure Python dictionaries, ~10 s per chooser. Writes
``benchmarks/results/headroom.{json,md,png}`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay import AnpdDrafter, Corpus, SuffixDrafter, load_references, replay  # noqa: E402

from vllm_anpd.core import AnpdParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
N_MIN, N_MAX = 2, 7  # ANPD's default levels
CROSS_MIN_COUNT = 2  # ANPD's default gate of the shared table
CHOOSERS = ("highest", "recent", "oracle-top2", "oracle-top-or-recent", "oracle-tops", "oracle-any",
            "highest+oracle-stop", "oracle-tops+oracle-stop")
CALIBRATED_COST = (0.06527, 0.004551)  # seconds per step + per scored token, batch 1 (BENCHMARKS.md, set-up)


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
        self.chooser, _, stop = chooser.partition("+")
        self.perfect_stop = stop == "oracle-stop"
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
                if token is None or (self.perfect_stop and token != truth):
                    break
                drafts[i, j] = token
                lens[i] += 1
                chain.append(token)
        return drafts, lens

    def choose(self, own: Table, chain: list, truth: int):
        own_matches = list(own.matches(chain))
        shared_matches = list(self.shared.matches(chain, CROSS_MIN_COUNT))
        if self.chooser == "recent" and own_matches:
            return own.last[own_matches[0][0]]
        elif self.chooser == "oracle-top-or-recent" and own_matches:
            key, _, top = own_matches[0]
            if truth in (top, own.last[key]):
                return truth
        elif self.chooser == "oracle-top2" and own_matches:
            successors = own_matches[0][1]
            if truth in sorted(successors, key=successors.get, reverse=True)[:2]:
                return truth
        elif self.chooser == "oracle-tops":
            if any(top == truth for _, _, top in own_matches + shared_matches):
                return truth
        elif self.chooser == "oracle-any":
            if any(truth in successors for _, successors, _ in own_matches + shared_matches):
                return truth
        best = own_matches or shared_matches
        return best[0][2] if best else None


def run(name: str, drafter, corpus, k: int, cost) -> dict:
    res = replay(corpus, drafter, k, batch=1, cost=cost)
    steps = int(res["steps"].sum())
    return {"chooser": name, "k": k, "mat": int(res["produced"].sum()) / steps,
            "drafted_per_step": int(res["drafted"].sum()) / steps,
            "modelled_speedup": res["modelled_baseline"] / res["modelled_time"]}


def drafters(corpus, k: int):
    """(name, drafter) of every row: the choosers, then ANPD's kernels and ``suffix`` for reference."""
    for chooser in CHOOSERS:
        yield chooser, ChooserDrafter(chooser, corpus)
    yield "anpd (kernels, defaults)", AnpdDrafter(AnpdParams(num_speculative_tokens=k), len(corpus.refs))
    try:
        yield "suffix (vLLM defaults)", SuffixDrafter(k, corpus)
    except ImportError:
        print("arctic-inference not installed: the suffix row is skipped (VLLM_ANPD_SUFFIX=1 bash scripts/install.sh)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--limit", type=int, default=0, help="first N references only (0: all)")
    ap.add_argument("--cost", type=float, nargs=2, default=list(CALIBRATED_COST), metavar=("A", "B"),
                    help="step-time model a + b x tokens for the modelled speedup (default: this machine's)")
    ap.add_argument("--out", type=str, default="headroom", help="results/<out>.{json,md,png}")
    args = ap.parse_args()
    references = load_references()
    if args.limit:
        references = references[:args.limit]
    corpus = Corpus(references)
    rows = [run(name, drafter, corpus, args.k, tuple(args.cost))
            for name, drafter in tqdm(drafters(corpus, args.k), total=len(CHOOSERS) + 2, desc="drafters")]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    base = rows[0]["mat"]
    suffix = next((r["modelled_speedup"] for r in rows if r["chooser"].startswith("suffix")), None)
    lines = [f"| drafter (k = {args.k}, {len(references)} prompts) | MAT | vs highest | drafted/step "
             "| modelled speedup (batch 1) | vs suffix's |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['chooser']} | {r['mat']:.3f} | {r['mat'] / base:.3f}x | {r['drafted_per_step']:.2f} "
              f"| {r['modelled_speedup']:.3f} | "
              + (f"{r['modelled_speedup'] / suffix:.3f}x |" if suffix else "- |") for r in rows]
    table = "\n".join(lines) + "\n"
    (RESULTS / f"{args.out}.md").write_text(table)
    print(table, end="")
    plot(rows, args.k, len(references), RESULTS / f"{args.out}.png")


def plot(rows: list, k: int, n_prompts: int, path: Path) -> None:
    """Two panels over the same drafters: MAT, and the modelled speedup (where stopping shows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["chooser"] for r in rows]
    colors = ["tab:orange" if not n.startswith(("highest", "recent", "oracle")) else
              "tab:blue" if n == "highest" else "tab:gray" for n in names]
    fig, axes = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    panels = (("mat", "mean accepted tokens\nper step (MAT)"),
              ("modelled_speedup", "modelled speedup vs\nno speculation (batch 1)"))
    for ax, (field, label) in zip(axes, panels):
        values = [r[field] for r in rows]
        ax.bar_label(ax.bar(names, values, color=colors), fmt="%.3f")
        ax.set_ylabel(label)
        ax.set_ylim(1.0, max(values) * 1.12)
    axes[1].tick_params(axis="x", labelrotation=30)
    for label in axes[1].get_xticklabels():
        label.set_horizontalalignment("right")
    axes[1].set_xlabel("drafter (oracles peek at the reference: ceilings; orange: real drafters)")
    axes[0].set_title(f"Selection and stopping headroom, Spec-Bench replay, batch 1, k = {k}, {n_prompts} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
