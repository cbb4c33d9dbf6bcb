"""Lossless end to end: greedy token ids with ANPD equal the same engine's without speculation, exactly.

65 Spec-Bench prompts (5 per category, all 13 categories), float32, at max_num_seqs 16 and 1. float32 results
can depend on the batch's composition, so each max_num_seqs is compared with a no-speculation run at the same
max_num_seqs. One engine at a time.
"""

from __future__ import annotations

import pytest

from engine_helpers import ANPD, drafter_stats, greedy, make_llm, shutdown, spec_bench_prompts, spec_metrics, \
    token_ids

pytestmark = pytest.mark.engine
# Shorter at batch 1, where every token is its own engine step (~70 ms here), to keep CI well inside its budget.
MAX_TOKENS = {16: 128, 1: 64}


def run_no_speculation(max_num_seqs):
    llm = make_llm(max_num_seqs=max_num_seqs)
    try:
        prompts = spec_bench_prompts(llm.get_tokenizer(), per_category=5)
        return prompts, token_ids(llm.generate(prompts, greedy(MAX_TOKENS[max_num_seqs]), use_tqdm=False))
    finally:
        shutdown(llm)


@pytest.mark.parametrize("max_num_seqs", [16, 1])
def test_anpd_greedy_equals_no_speculation(max_num_seqs):
    prompts, expected = run_no_speculation(max_num_seqs)
    assert len(prompts) >= 60
    llm = make_llm(ANPD, max_num_seqs=max_num_seqs)
    try:
        got = token_ids(llm.generate(prompts, greedy(MAX_TOKENS[max_num_seqs]), use_tqdm=False))
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
