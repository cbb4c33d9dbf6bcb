"""In-process A/B of the drafting core: this checkout's ``vllm_anpd.core`` against the same package at another
git revision, stepping the same batches turn about in one process.

    python benchmarks/core_ab.py --base HEAD~1                                   # 1k and 16k context, batch 1 and 64
    python benchmarks/core_ab.py --base 307d95a --contexts 16384 --batches 64 --evict-mb 128 --max-draft 1

Why in one process: on the shared VMs this project runs on, two ``step_cost.py`` runs a minute apart differ
by 10-40 % (BENCHMARKS.md section 2), more than most changes to the core are worth. Here the base core and
this checkout's step the same contexts in alternation, each step in the order the previous step did not use
(base-new, new-base, ...), so the VM's drift falls on both sides alike; each side's own steady state is
kept apart (their own tables, their own fold thread). Steps are timed as ``step_cost.py`` times ANPD's
critical path (``NgramTables.step``, the background fold waited for untimed; ``--fold-in-step``: all of the
step's work, the fold inside it, as vLLM CPU runs it), ``--evict-mb`` reads a buffer
before every step as a forward pass evicts the caches (``--evict-with``: how, see ``step_cost.cache_evictor``).
Per point: the median, 25th and 75th percentile microseconds per step of each side, new / base, and whether
both drafted the same tokens at every step (a change meant to keep the drafts shows here if it does not).
When this checkout's core has uncommitted changes, their diff is kept in the JSON (``new_core_diff``), so that
an experiment not committed can still be read.

The base is the ``vllm_anpd/core`` directory of that revision (``git archive``), imported as a package of its
own. Extracted copies stay in ``$VLLM_ANPD_CACHE/core_ab/<commit>``, so that numba's disk cache of their
kernels outlives the run (a first run compiles them: ~15 s). ``--base-dir`` takes a core package's
directory instead (copied the same way, under a name from its path).

Writes ``benchmarks/results/<out>.{json,md,png}`` (``--out`` defaults to ``core_ab``), naming the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))  # "new" is this checkout's core, wherever an installed vllm_anpd points
import machine  # noqa: E402
import step_cost  # noqa: E402
from anpd_options import anpd_overrides  # noqa: E402

import vllm_anpd.core.tables as new_tables  # noqa: E402
from vllm_anpd import models  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
K = step_cost.K


def cache_root() -> Path:
    return models.cache_dir() / "core_ab"


def _install(package: str, fill) -> Path:
    """``cache_root()/<package>/<package>`` made by ``fill(directory)`` once (into a temporary directory first,
    so that an interrupted copy is never taken for a whole one); returns the directory to put on sys.path."""
    parent = cache_root() / package
    if not (parent / package / "__init__.py").exists():
        partial = cache_root() / f".{package}.{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            fill(partial / package)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(parent, ignore_errors=True)
        partial.rename(parent)
    return parent


def core_at_revision(revision: str, repo: Path = REPO) -> tuple[str, Path]:
    """(package name, directory for sys.path) of ``vllm_anpd/core`` as it is at ``revision``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=repo, check=True,
                                capture_output=True, text=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise SystemExit(f"--base {revision!r}: not a git revision of {repo} ({e})") from None
    package = f"anpd_core_{commit[:12]}"

    def fill(target: Path) -> None:
        try:
            archive = subprocess.run(["git", "archive", commit, "vllm_anpd/core"], cwd=repo, check=True,
                                     capture_output=True).stdout
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"--base {revision!r}: no vllm_anpd/core at {commit[:12]} "
                             f"({e.stderr.decode(errors='replace').strip()})") from None
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("vllm_anpd/core/")]
            for m in members:
                m.name = m.name[len("vllm_anpd/core/"):]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python 3.10.12+, 3.11.4+
            tar.extractall(target, members=members, **safe)

    return package, _install(package, fill)


def core_in_directory(directory: Path) -> tuple[str, Path]:
    """(package name, directory for sys.path) of a copy of the core package in ``directory``."""
    directory = Path(directory).resolve()
    if not (directory / "tables.py").exists():
        raise SystemExit(f"--base-dir {str(directory)!r}: no core package there (no tables.py)")
    stamp = "".join(f"{p.name}:{p.stat().st_mtime_ns};" for p in sorted(directory.glob("*.py")))
    package = "anpd_core_dir_" + hashlib.sha1(f"{directory}|{stamp}".encode()).hexdigest()[:12]
    return package, _install(package, lambda target: shutil.copytree(
        directory, target, ignore=shutil.ignore_patterns("__pycache__")))


def uncommitted_core_diff(repo: Path = REPO) -> str:
    """``git diff HEAD`` of this checkout's core: what "new" was, when it is not a commit ("" when it is)."""
    try:
        return subprocess.run(["git", "diff", "HEAD", "--", "vllm_anpd/core"], cwd=repo, check=True,
                              capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return ""


def import_core(package: str, path: Path):
    """The base core's ``tables`` module (its ``NgramTables`` and ``AnpdParams``)."""
    sys.path.insert(0, str(path))
    return importlib.import_module(f"{package}.tables")


def run_point(base_module, context, batch, steps, overrides, max_draft, evict, fold_in_step=False) -> dict:
    """Both cores on the same batch, as ``step_cost.AnpdRunner`` runs one (prefilled untimed, the background fold
    waited for outside the timed step, or with ``fold_in_step`` run inside it, as on vLLM CPU), stepped turn
    about."""
    tokens = step_cost.make_batch(context, batch, steps)
    sides = {name: step_cost.AnpdRunner(tokens, context, batch, overrides, not fold_in_step, max_draft, core=core)
             for name, core in (("base", base_module), ("new", new_tables))}
    times = {name: [] for name in sides}
    same_drafts = True
    drafted = 0
    for s in range(1, steps + 1):
        num_tokens = np.full(batch, context + 2 * s, np.int32)  # an accepted draft token + the bonus token
        drafts = {}
        for name in (("base", "new") if s % 2 else ("new", "base")):
            if evict is not None:
                evict()  # as a forward pass does: the weights stream through every cache level
            side = sides[name]
            times[name].append(side.step(num_tokens))
            drafts[name] = [row[:n] for row, n in zip(side.drafts.tolist(), side.lens.tolist())]
        same_drafts &= drafts["base"] == drafts["new"]
        drafted += sum(map(len, drafts["new"]))
    row = {"context": context, "batch": batch, "same_drafts": bool(same_drafts),
           "new_mean_draft": drafted / (steps * batch)}
    for name in sides:
        us = np.array(times[name]) * 1e6
        row[f"{name}_us"] = float(np.median(us))
        row[f"{name}_p25_us"] = float(np.percentile(us, 25))
        row[f"{name}_p75_us"] = float(np.percentile(us, 75))
    row["new_over_base"] = row["new_us"] / row["base_us"]
    return row


def plot(rows, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(rows) + 2), 4.5))
    x = np.arange(len(rows))
    for offset, name, color in ((-0.2, "base", "tab:gray"), (0.2, "new", "tab:blue")):
        ax.bar(x + offset, [r[f"{name}_us"] for r in rows], 0.4, color=color, label=name)
        ax.vlines(x + offset, [r[f"{name}_p25_us"] for r in rows], [r[f"{name}_p75_us"] for r in rows], color="black")
    ax.set_xticks(x, [(f"{r['context'] // 1024}k" if r["context"] % 1024 == 0 else str(r["context"]))
                      + f" x {r['batch']}" for r in rows])
    medians = [r[f"{name}_us"] for r in rows for name in ("base", "new")]
    if max(medians) > 20 * min(medians):
        ax.set_yscale("log")
    ax.set_xlabel("context tokens x batch size")
    ax.set_ylabel("us per step (median; lines: 25th-75th percentile)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = ap.add_mutually_exclusive_group()
    base.add_argument("--base", default="HEAD", help="git revision whose core is the base (default HEAD)")
    base.add_argument("--base-dir", type=Path, help="a core package's directory as the base, instead of --base")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=200, help="timed steps of each side per point")
    step_cost.add_evict_arguments(ap, "every step")
    ap.add_argument("--max-draft", type=int, default=K, help=f"tokens drafted at most per row (default {K})")
    ap.add_argument("--anpd", type=anpd_overrides, default={}, help="JSON of AnpdParams overrides, for both sides")
    ap.add_argument("--fold-in-step", action="store_true",
                    help="time all of a step's work: the fold runs inside the step, as on vLLM CPU (whose worker "
                         "is bound to one core), instead of on the tables' thread, waited for untimed")
    ap.add_argument("--out", default="core_ab", help="results/<out>.{json,md,png}")
    args = ap.parse_args(argv)
    for name in ("contexts", "batches"):
        if min(getattr(args, name)) < 1:
            ap.error(f"--{name} {getattr(args, name)}: every value must be >= 1")
    if args.steps < 1 or args.evict_mb < 0 or not 0 <= args.max_draft <= K:
        ap.error(f"--steps {args.steps} (>= 1), --evict-mb {args.evict_mb} (>= 0), --max-draft {args.max_draft} "
                 f"(0..{K}): one is out of range")
    overrides = args.anpd
    package, path = core_in_directory(args.base_dir) if args.base_dir else core_at_revision(args.base)
    base_module = import_core(package, path)
    evict = step_cost.cache_evictor(args.evict_mb, args.evict_with)
    grid = [(c, b) for c in args.contexts for b in args.batches]
    rows = [run_point(base_module, c, b, args.steps, overrides, args.max_draft, evict, args.fold_in_step)
            for c, b in tqdm(grid, desc="core A/B")]

    base_name = str(args.base_dir) if args.base_dir else args.base
    conditions = step_cost.evicted_conditions(args) if args.evict_mb else "back to back"
    conditions += ", the fold inside the step (all work)" if args.fold_in_step else ", the fold on its thread (untimed)"
    info = {"machine": machine.describe(), "stream": step_cost.stream_source()}
    RESULTS.mkdir(exist_ok=True)
    diff = uncommitted_core_diff()
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"args": {**vars(args), "base_dir": base_name},
                                                          "base_package": package, "new_core": new_tables.__file__,
                                                          "new_core_diff": diff, **info,
                                                          "rows": rows}, indent=1))
    new_name = "this checkout's" + (f" (uncommitted changes to the core, {len(diff.splitlines())} diff lines, in "
                                    f"the JSON's `new_core_diff`)" if diff else "")
    lines = [f"Measured on {machine.one_line(info['machine'])}. Text: {info['stream']}.", "",
             f"Base: the core at `{base_name}` (`{package}`); new: {new_name}. {conditions}, "
             f"{args.steps} steps per side, k = {args.max_draft}.", "",
             "| context | batch | base us (p25-p75) | new us (p25-p75) | new / base | same drafts | new's mean draft |",
             "|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['batch']} | {r['base_us']:.0f} ({r['base_p25_us']:.0f}-"
                     f"{r['base_p75_us']:.0f}) | {r['new_us']:.0f} ({r['new_p25_us']:.0f}-{r['new_p75_us']:.0f}) | "
                     f"{r['new_over_base']:.3f} | {'yes' if r['same_drafts'] else 'no'} | {r['new_mean_draft']:.2f} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{args.out}.md").write_text(text)
    plot(rows, RESULTS / f"{args.out}.png", f"ANPD core: {base_name} vs this checkout, {conditions}")
    print(text)
    return rows


if __name__ == "__main__":
    main()
