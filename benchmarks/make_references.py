"""Reference greedy outputs for the replay simulator: vLLM itself, no speculation, on the real model.

    python benchmarks/make_references.py [--max-tokens 256] [--limit N]

Writes ``$VLLM_ANPD_CACHE/references/specbench_t{max_tokens}.jsonl`` (outside the repo): one line per
Spec-Bench first turn with the prompt token ids and the greedy output token ids (float32).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vllm_anpd import models, specbench


def reference_path(max_tokens: int) -> Path:
    return models.cache_dir() / "references" / f"specbench_t{max_tokens}.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=0, help="first N questions only (0: all 480)")
    args = ap.parse_args()
    from vllm import LLM, SamplingParams

    questions = specbench.load_questions()
    if args.limit:
        questions = questions[: args.limit]
    llm = LLM(**models.engine_kwargs(max_num_seqs=64))
    tok = llm.get_tokenizer()
    prompts = [specbench.chat_prompt(tok, q.text) for q in questions]
    t0 = time.time()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=True)
    elapsed = time.time() - t0
    path = reference_path(args.max_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for q, o in zip(questions, outs):
            f.write(json.dumps({"question_id": q.question_id, "category": q.category,
                                "prompt_ids": list(o.prompt_token_ids),
                                "output_ids": list(o.outputs[0].token_ids)}) + "\n")
    tmp.replace(path)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"wrote {path}: {len(outs)} requests, {n_out} output tokens in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
