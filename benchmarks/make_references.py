"""Reference outputs for the replay simulator: vLLM itself, no speculation, on the real model.

    python benchmarks/make_references.py [--max-tokens 256] [--limit N] [--temperature T]

Writes ``$VLLM_ANPD_CACHE/references/specbench_t{max_tokens}.jsonl`` (outside the repo): one line per
Spec-Bench first turn with the prompt token ids and the greedy output token ids (float32).

With ``--temperature T > 0`` the outputs are sampled instead (request ``i`` seeded with ``i``), into
``specbench_t{max_tokens}_temp{T}.jsonl``. Replaying them is exact in distribution for sampled requests: vLLM
accepts a draft token (its own proposal, no draft probabilities) with probability ``p(draft)``, and a token
sampled from ``p`` equals the draft with that same probability; both then go on with a sample of ``p``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from engine_bench import sampling_params, temperature_arg

from vllm_anpd import models, specbench


def reference_path(max_tokens: int, temperature: float = 0.0) -> Path:
    sampled = f"_temp{temperature:g}" if temperature else ""
    return models.cache_dir() / "references" / f"specbench_t{max_tokens}{sampled}.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=0, help="first N questions only (0: all 480)")
    ap.add_argument("--temperature", type=temperature_arg, default=0.0,
                    help="0: greedy (default); else sampled, request i seeded with i")
    args = ap.parse_args()
    from vllm import LLM

    questions = specbench.load_questions()
    if args.limit:
        questions = questions[: args.limit]
    llm = LLM(**models.engine_kwargs(max_num_seqs=64))
    tok = llm.get_tokenizer()
    prompts = [specbench.chat_prompt(tok, q.text) for q in questions]
    t0 = time.time()
    outs = llm.generate(prompts, sampling_params(len(prompts), args.temperature, args.max_tokens), use_tqdm=True)
    elapsed = time.time() - t0
    path = reference_path(args.max_tokens, args.temperature)
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
