"""Shared helpers for tests that start a real vLLM engine (vLLM CPU, SmolLM2-135M-Instruct, float32)."""

from __future__ import annotations

import gc

from vllm_anpd import models, specbench

ANPD = {"method": "anpd", "num_speculative_tokens": 5}


def make_llm(speculative_config=None, **overrides):
    from vllm import LLM

    kwargs = models.engine_kwargs(**overrides)
    kwargs.setdefault("disable_log_stats", False)
    kwargs.setdefault("worker_extension_cls", "vllm_anpd.worker_extension.AnpdWorkerExtension")
    return LLM(speculative_config=speculative_config, **kwargs)


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        del llm
        gc.collect()


def greedy(max_tokens: int, **kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def spec_bench_prompts(tokenizer, per_category: int) -> list[str]:
    qs = specbench.stratified(specbench.load_questions(), per_category)
    return [specbench.chat_prompt(tokenizer, q.text) for q in qs]


def drafter_stats(llm) -> dict:
    stats = [s for s in llm.collective_rpc("anpd_stats") if s is not None]
    assert stats, "no ANPD proposer in the engine's workers"
    return stats[0]


def spec_metrics(llm) -> dict:
    """vLLM's own spec-decode counters (Prometheus exports them with a "_total" suffix)."""
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode") and not m.name.endswith("_per_pos"):
            value = getattr(m, "value", None)
            if value is None and hasattr(m, "values"):
                value = sum(m.values)
            out[m.name] = out.get(m.name, 0) + (value or 0)
    return out
