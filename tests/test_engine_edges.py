"""Lifecycle edges on the real engine, each compared with the same engine without speculation (float32):
requests ending exactly at max_model_len, chunked prefill, preemption (tiny KV cache), aborts mid-generation,
sampled and n > 1 requests mixed into a greedy batch. Two engines, one after the other.
"""

from __future__ import annotations

import pytest

from engine_helpers import ANPD, drafter_stats, greedy, make_llm, shutdown, token_ids

pytestmark = pytest.mark.engine

MAX_MODEL_LEN = 384
# KV cache for about 1,300 tokens (SmolLM2-135M, float32: 30 layers x 3 KV heads x 64 x 2 x 4 B per token):
# eight concurrent requests of ~300 tokens cannot all fit, so the scheduler preempts.
ENGINE = dict(max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_num_batched_tokens=128,
              enable_chunked_prefill=True, kv_cache_memory_bytes=1300 * 46080)

REPEAT = "The quick brown fox jumps over the lazy dog. " * 6
PROMPTS = [
    "List the numbers from 1 to 40, separated by commas.",
    "Repeat this sentence three times: " + REPEAT,
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Count backwards from 30 to 1.",
    "Name the planets of the solar system, one per line, with one fact each.",
    "Write a Python function that returns the factorial of n.",
    "Translate to French: the cat sleeps on the warm windowsill.",
]
LONG = "Summarize the following text.\n" + ("Speculative decoding drafts tokens that the target model "
                                         "verifies in one forward pass. ") * 14  # > 128 tokens: chunked


def workload(tokenizer):
    """(prompt, SamplingParams) pairs covering every edge; the same list runs on both engines."""
    items = [(p, greedy(300)) for p in PROMPTS]  # ~8 x 300 tokens: preemption
    items.append((LONG, greedy(64)))
    short = "Say hello."
    n_prompt = len(tokenizer(short)["input_ids"])
    for j in range(4):  # ends exactly at, or just before, max_model_len
        items.append((short, greedy(MAX_MODEL_LEN - n_prompt - j, ignore_eos=True)))
    return items


def run(llm, items):
    return token_ids(llm.generate([p for p, _ in items], [s for _, s in items], use_tqdm=False))


def run_with_aborts(llm, prompts, abort_ids, abort_after_steps=6):
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"req-{i}", p, greedy(200))
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps == abort_after_steps:
            engine.abort_request([f"req-{i}" for i in abort_ids])
    return done


def mixed_batch():
    """Greedy requests with sampled and n > 1 requests in the same batch."""
    from vllm import SamplingParams

    return PROMPTS[:4], [greedy(300), SamplingParams(temperature=0.8, top_p=0.95, max_tokens=60, seed=1),
                         greedy(300), SamplingParams(temperature=1.0, n=3, max_tokens=40, seed=2)]


@pytest.fixture(scope="module")
def baseline():
    llm = make_llm(None, **ENGINE)
    items = workload(llm.get_tokenizer())
    ref = run(llm, items)
    ref_abort = run_with_aborts(llm, PROMPTS[:4], abort_ids=[1, 2])
    # The greedy outputs of the mixed batch, from the same batch without speculation: float32 results can
    # depend on the batch's composition, so the reference is the same batch.
    ref_mixed = token_ids(llm.generate(*mixed_batch(), use_tqdm=False))
    shutdown(llm)
    return items, ref, ref_abort, ref_mixed


@pytest.fixture(scope="module")
def anpd_llm():
    llm = make_llm(ANPD, **ENGINE)
    yield llm
    shutdown(llm)


def num_preemptions(llm) -> float:
    return sum(getattr(m, "value", 0) or 0 for m in llm.get_metrics() if m.name.startswith("vllm:num_preemptions"))


def test_edges_equal_no_speculation(baseline, anpd_llm):
    items, ref, _, _ = baseline
    before = num_preemptions(anpd_llm)
    got = run(anpd_llm, items)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g == r, f"item {i} differs (max_tokens={items[i][1].max_tokens})"
    # The workload really exercised the edges.
    assert num_preemptions(anpd_llm) > before, "no preemption happened: KV cache too large for the test"
    assert [len(g) for g in got[-4:]] == [items[-4 + j][1].max_tokens for j in range(4)]
    anpd_llm.generate(["Hi"], greedy(1), use_tqdm=False)  # a step after the batch: finished ids are dropped
    stats = drafter_stats(anpd_llm)
    assert stats["accepted_tokens"] > 0
    assert stats["tracked_requests"] == stats["runner_requests"] <= 1


def test_aborts_mid_generation(baseline, anpd_llm):
    _, _, ref_abort, _ = baseline
    done = run_with_aborts(anpd_llm, PROMPTS[:4], abort_ids=[1, 2])
    for rid in ("req-0", "req-3"):
        assert done[rid] == ref_abort[rid]
    anpd_llm.generate(["Hi"], greedy(1), use_tqdm=False)
    stats = drafter_stats(anpd_llm)
    assert stats["tracked_requests"] == stats["runner_requests"] <= 1  # aborted requests released too


def test_sampled_and_n_gt_1_mixed_with_greedy(baseline, anpd_llm):
    _, _, _, ref_mixed = baseline
    outs = anpd_llm.generate(*mixed_batch(), use_tqdm=False)
    assert list(outs[0].outputs[0].token_ids) == ref_mixed[0]
    assert list(outs[2].outputs[0].token_ids) == ref_mixed[2]
    assert len(outs[1].outputs[0].token_ids) > 0
    assert len(outs[3].outputs) == 3 and all(len(c.token_ids) > 0 for c in outs[3].outputs)
    anpd_llm.generate(["Hi"], greedy(1), use_tqdm=False)
    stats = drafter_stats(anpd_llm)
    assert stats["tracked_requests"] == stats["runner_requests"] <= 1
