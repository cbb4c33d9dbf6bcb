"""``AnpdWorkerExtension``: methods vLLM mixes into its workers (``worker_extension_cls``), so that
``LLM.collective_rpc("anpd_stats")`` reads ANPD's statistics by name, without pickling a function.

    llm = LLM(..., speculative_config={"method": "anpd", ...},
              worker_extension_cls="vllm_anpd.worker_extension.AnpdWorkerExtension")
    llm.collective_rpc("anpd_stats")   # one dict per worker (None where the worker has no ANPD proposer)
"""

from __future__ import annotations

from . import _vllm_compat


class AnpdWorkerExtension:
    def anpd_stats(self):
        return _vllm_compat.drafter_stats(self)

    def anpd_time_drafter(self) -> bool:
        return _vllm_compat.time_drafter(self)

    def anpd_drafter_seconds(self):
        return _vllm_compat.drafter_seconds(self)

    def anpd_drafter_call_seconds(self):
        return _vllm_compat.drafter_call_seconds(self)

    def anpd_reset_drafter(self) -> str:
        return _vllm_compat.reset_drafter(self)
