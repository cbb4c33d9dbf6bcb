"""Offline batch generation with ANPD speculative decoding, on the embedded default model.

    python examples/offline_inference.py [--model PATH] [--num-prompts 26] [--k 8] [--max-tokens 128]

Prints one completion and the acceptance figures: vLLM's own spec-decode counters and ANPD's statistics.
"""

import argparse
import time

from vllm import LLM, SamplingParams

from vllm_anpd import models, specbench

# Used when Spec-Bench's question.jsonl is not beside the repository (a pip install elsewhere): prompts whose
# answers repeat their input, where n-gram drafting pays, and one open-ended one, where it cannot.
BUILT_IN_PROMPTS = [
    specbench.Question(-1, "extraction", "List every city named in this text, one per line, in order: "
                       "The tour starts in Lisbon, crosses to Madrid and Barcelona, then flies to Rome. From Rome "
                       "it goes by train to Florence, Bologna and Venice, and ends in Vienna."),
    specbench.Question(-2, "coding", "Rename the variable `total` to `running_sum` in this Python function and "
                       "return the whole function:\n\ndef add_all(values):\n    total = 0\n    for v in values:\n"
                       "        total = total + v\n    return total\n"),
    specbench.Question(-3, "summarization", "Summarize in two sentences: Speculative decoding drafts several "
                       "tokens cheaply and lets the large model verify them in one forward pass. Tokens that match "
                       "what the model would have produced are kept, so the output is unchanged, and decoding "
                       "needs fewer sequential steps of the large model."),
    specbench.Question(-4, "writing", "Write a short poem about the sea at night."),
]


def load_prompts(num_prompts: int) -> list:
    """Spec-Bench first turns spread over its 13 categories, or the built-in prompts without Spec-Bench.
    Read before the engine starts, so that a missing file costs no engine start-up."""
    try:
        questions = specbench.load_questions()
    except FileNotFoundError as e:
        print(f"{e}\nUsing the {len(BUILT_IN_PROMPTS)} built-in prompts instead.")
        return BUILT_IN_PROMPTS[:num_prompts]
    per_category = max(1, -(-num_prompts // 13))
    return specbench.stratified(questions, per_category)[:num_prompts]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct, embedded)")
    ap.add_argument("--num-prompts", type=int, default=26, help="Spec-Bench first turns, spread over categories")
    ap.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    if args.num_prompts < 1:
        ap.error(f"--num-prompts {args.num_prompts}: must be >= 1")
    questions = load_prompts(args.num_prompts)

    kwargs = models.engine_kwargs(max_num_seqs=16, disable_log_stats=False,
                                  worker_extension_cls="vllm_anpd.worker_extension.AnpdWorkerExtension")
    if args.model:
        kwargs["model"] = args.model
    llm = LLM(speculative_config={"method": "anpd", "num_speculative_tokens": args.k}, **kwargs)

    prompts = [specbench.chat_prompt(llm.get_tokenizer(), q.text) for q in questions]
    t0 = time.time()
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    elapsed = time.time() - t0

    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n--- {questions[0].category}: {questions[0].text[:80]}...\n{outputs[0].outputs[0].text[:400]}\n")
    counters = {m.name: m.value for m in llm.get_metrics()
                if m.name.startswith("vllm:spec_decode") and hasattr(m, "value")}
    drafts = counters.get("vllm:spec_decode_num_drafts", 0)
    drafted = counters.get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = counters.get("vllm:spec_decode_num_accepted_tokens", 0)
    print(f"{len(prompts)} prompts, {n_out} tokens in {elapsed:.1f} s ({n_out / elapsed:.1f} tok/s)")
    if drafts:
        print(f"vLLM counters: {drafts:.0f} drafts, {drafted:.0f} draft tokens, {accepted:.0f} accepted "
              f"(acceptance rate {accepted / max(drafted, 1):.2f}, mean accepted length "
              f"{1 + accepted / drafts:.2f} tokens per drafted step)")
    stats = [s for s in llm.collective_rpc("anpd_stats") if s is not None][0]
    print("ANPD per level (drafted / accepted):",
          ", ".join(f"{k} {v['drafted']}/{v['accepted']}" for k, v in stats["per_level"].items()))


if __name__ == "__main__":
    main()
