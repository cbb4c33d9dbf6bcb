"""ANPD drafting core: numpy arrays and numba kernels, no vLLM (a test enforces it).

Imports are lazy: ``vllm_anpd.core.config`` must be importable without numba, because the plugin imports it in
every vLLM process before the worker is initialised, and vLLM CPU's ``register_triton_kernel_overrides``
(``platforms/cpu.py``, run in ``init_worker``) scans every loaded module and fails on llvmlite's objects.
"""

from .config import AnpdParams

__all__ = ["AnpdParams", "BatchBudget", "NgramTables"]


def __getattr__(name):
    if name == "NgramTables":
        from .tables import NgramTables

        return NgramTables
    if name == "BatchBudget":
        from .budget import BatchBudget

        return BatchBudget
    raise AttributeError(f"module 'vllm_anpd.core' has no attribute {name!r}")
