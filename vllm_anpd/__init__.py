"""vllm_anpd: Adaptive N-gram Parallel Decoding for vLLM.

``vllm_anpd.core`` holds the drafting algorithm (no vLLM import); ``vllm_anpd.proposer`` the vLLM-facing
proposer; ``vllm_anpd.plugin`` the entry point that makes ``"method": "anpd"`` available.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that importing vllm_anpd (or vllm_anpd.core) never imports vLLM. Lets the zero-patch route
    # {"method": "custom_class", "model": "vllm_anpd.AnpdProposer"} find the class.
    if name == "AnpdProposer":
        from .proposer import AnpdProposer

        return AnpdProposer
    raise AttributeError(f"module 'vllm_anpd' has no attribute {name!r}")
