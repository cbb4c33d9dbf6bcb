"""vllm_anpd: Adaptive N-gram Parallel Decoding for vLLM.

``vllm_anpd.core`` holds the drafting algorithm (no vLLM import); ``vllm_anpd.proposer`` the vLLM-facing
proposer; ``vllm_anpd.plugin`` the entry point that makes ``"method": "anpd"`` available.
"""

__version__ = "0.1.0"
