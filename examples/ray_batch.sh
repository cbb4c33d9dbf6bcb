#!/usr/bin/env bash
# Batch generation with ANPD on Ray: N data-parallel vLLM engines, resumable shards.
#   bash examples/ray_batch.sh [NUM_ENGINES] [RAY_ADDRESS]
# Without RAY_ADDRESS a local Ray is started. On a cluster (`ray start --head` on one node,
# `ray start --address HEAD:6379` on the others) pass `auto`: the command is otherwise the same.
# Rerun after an interruption: finished shards in out.jsonl.shards/ are kept, the rest is generated.
set -euo pipefail
NUM_ENGINES=${1:-2}
ADDRESS=${2:-}
WORK=${WORK:-$(mktemp -d)}
cat > "$WORK/prompts.jsonl" <<'JSONL'
{"id": "fib", "prompt": "Write a Python function that returns the n-th Fibonacci number.\n"}
{"id": "sort", "prompt": "Explain how merge sort works, step by step.\n"}
{"id": "json", "prompt": "List three colours as a JSON array of objects with the keys name and hex.\n"}
{"id": "capital", "prompt_token_ids": [504, 3575, 282, 4649, 314]}
JSONL
python -m vllm_anpd.batch --input "$WORK/prompts.jsonl" --output "$WORK/out.jsonl" \
  --num-engines "$NUM_ENGINES" ${ADDRESS:+--address "$ADDRESS"} \
  --speculative-config '{"method": "anpd", "num_speculative_tokens": 5}' \
  --max-tokens 128 --temperature 0 --shard-size 2
head -c 600 "$WORK/out.jsonl"; echo
