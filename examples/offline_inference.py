"""Offline batch generation with ANPD speculative decoding, on the embedded default model.

    python examples/offline_inference.py [--model PATH] [--num-prompts 26] [--k 8] [--max-tokens 128]

Prints one completion and the acceptance figures: vLLM's own spec-decode counters and ANPD's statistics.
"""

import argparse
import time

from vllm import LLM, SamplingParams

from vllm_anpd import models, specbench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct, embedded)")
    ap.add_argument("--num-prompts", type=int, default=26, help="Spec-Bench first turns, spread over categories")
    ap.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    kwargs = models.engine_kwargs(max_num_seqs=16, disable_log_stats=False,
                                  worker_extension_cls="vllm_anpd.worker_extension.AnpdWorkerExtension")
    if args.model:
        kwargs["model"] = args.model
    llm = LLM(speculative_config={"method": "anpd", "num_speculative_tokens": args.k}, **kwargs)

    per_category = max(1, -(-args.num_prompts // 13))
    questions = specbench.stratified(specbench.load_questions(), per_category)[: args.num_prompts]
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
