"""Soak: many requests through one engine with ANPD; the proposer's memory must return to its baseline and
the processes' RSS must stay bounded. Used by ``benchmarks/soak.py`` (1,000 requests) and, shorter, by the
end-to-end tests.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass


@dataclass
class SoakPoint:
    requests_done: int
    seconds: float
    tracked_requests: int  # requests ANPD holds state for (after a step that released the finished ones)
    request_bytes: int  # ANPD bytes without the bounded cross-request table
    cross_request_bytes: int
    rss_bytes: int  # this process and its children (engine core, workers)
    huge_page_bytes: int  # of rss_bytes, anonymous memory in transparent huge pages (Linux; 0 elsewhere)


def process_tree_memory() -> tuple[int, int]:
    """(RSS, of it in transparent huge pages) in bytes, summed over this process and its children. The
    second figure tells whether the core's huge-page tables (``kernels.new_records``) weigh in the RSS."""
    import psutil

    me = psutil.Process()
    rss = huge = 0
    for process in [me] + me.children(recursive=True):
        try:
            rss += process.memory_info().rss
        except psutil.Error:
            continue
        huge += _anon_huge_page_bytes(process.pid)
    return rss, huge


def _anon_huge_page_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def measure(llm, requests_done: int, started: float) -> SoakPoint:
    from vllm import SamplingParams

    # One tiny request: its step makes vLLM's runner (and so ANPD) drop every finished request.
    llm.generate(["Hi"], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    stats = ([s for s in llm.collective_rpc("anpd_stats") if s] or [None])[0]
    if stats is None:  # an engine without ANPD (the control run): only the RSS is measured
        stats = {"tracked_requests": 0, "bytes_in_use": 0}
    cross = stats.get("cross_request", {}).get("bytes", 0)
    return SoakPoint(requests_done, time.perf_counter() - started, stats["tracked_requests"],
                     stats["bytes_in_use"] - cross, cross, *process_tree_memory())


def run_soak(llm, prompts: list, num_requests: int, wave: int, max_tokens: int, progress: bool = False) -> list:
    """NUM_REQUESTS greedy requests (PROMPTS cycled) in waves of WAVE; a SoakPoint before the first wave
    (after one warm-up wave, not counted) and after each wave. The engine needs ANPD's worker extension."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.generate(prompts[:wave], params, use_tqdm=False)  # warm-up: compiled shapes, allocator pools
    started = time.perf_counter()
    points = [measure(llm, 0, started)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_requests, unit="req", desc="soak")
    done = 0
    while done < num_requests:
        n = min(wave, num_requests - done)
        batch = [prompts[(done + i) % len(prompts)] for i in range(n)]
        llm.generate(batch, params, use_tqdm=False)
        done += n
        points.append(measure(llm, done, started))
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return points


def as_dicts(points: list) -> list:
    return [asdict(p) for p in points]
