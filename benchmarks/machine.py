"""What a result was measured on: CPU, caches, versions and commit, stored beside the figures.

Proposer costs are memory-latency figures, and they move from one machine to the next far more than the
code does (vLLM ngram's 16k x 64 step: ~2,100 us on one of this project's VMs, ~1,000 us on another), so a
cost without its machine cannot be compared with anything.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + ("+changes" if dirty else "")


def describe() -> dict:
    """CPU model, logical cores, L2 and L3 sizes, Python and numba versions, the repository's commit, and glibc's
    tunables if set."""
    import numba

    cpu = _lscpu()
    return {
        "cpu": cpu.get("Model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "l2": cpu.get("L2 cache", "unknown"),
        "l3": cpu.get("L3 cache", "unknown"),
        "python": platform.python_version(),
        "numba": numba.__version__,
        "commit": _commit(),
        # malloc's behaviour (huge pages: glibc.malloc.hugetlb) moves memory-bound costs by 8-25 %.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def one_line(info: dict) -> str:
    line = (f"{info['cpu']}, {info['cores']} cores, L2 {info['l2']}, L3 {info['l3']}; Python {info['python']}, "
            f"numba {info['numba']}; commit {info['commit']}")
    if info.get("glibc_tunables"):
        line += f"; GLIBC_TUNABLES={info['glibc_tunables']}"
    return line
