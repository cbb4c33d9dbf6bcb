"""Lossless end to end: greedy token ids with ANPD equal the same engine's without speculation, exactly.

65 Spec-Bench prompts (5 per category, all 13 categories), float32, at max_num_seqs 16 and 1.
One engine at a time; each is shared by the module.
"""

from __future__ import annotations

import pytest

from engine_helpers import ANPD, drafter_stats, greedy, make_llm, shutdown, spec_bench_prompts, spec_metrics, \
    token_ids

pytestmark = pytest.mark.engine
MAX_TOKENS = 128


@pytest.fixture(scope="module")
def baseline():
    llm = make_llm(max_num_seqs=16)
    prompts = spec_bench_prompts(llm.get_tokenizer(), per_category=5)
    outs = token_ids(llm.generate(prompts, greedy(MAX_TOKENS), use_tqdm=False))
    shutdown(llm)
    return prompts, outs


@pytest.mark.parametrize("max_num_seqs", [16, 1])
def test_anpd_greedy_equals_no_speculation(baseline, max_num_seqs):
    prompts, expected = baseline
    assert len(prompts) >= 60
    llm = make_llm(ANPD, max_num_seqs=max_num_seqs)
    try:
        got = token_ids(llm.generate(prompts, greedy(MAX_TOKENS), use_tqdm=False))
        mismatched = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
        assert not mismatched, f"{len(mismatched)} outputs differ, first at prompt {mismatched[0]}"
        metrics = spec_metrics(llm)
        # One more tiny request: its step makes vLLM's runner (and so ANPD) drop the finished requests.
        llm.generate(["Hi"], greedy(1), use_tqdm=False)
        stats = drafter_stats(llm)
    finally:
        shutdown(llm)
    # Speculation really happened, and vLLM's metrics see ANPD's drafts.
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0
    assert stats["accepted_tokens"] > 0
    # Every finished request's state was released (at most the last tiny one is still held, as vLLM holds it).
    assert stats["tracked_requests"] == stats["active_requests"] == stats["runner_requests"] <= 1
