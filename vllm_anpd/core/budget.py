"""Batch-aware draft budget: how sure a draft token must be to pay for its verification.

With ``step time = a + b x tokens`` and ``verify_cost = b / a``, a batch of ``B`` requests that drafts
``D`` tokens and gets ``A`` accepted yields ``(B + A) / (a + b (B + D))`` tokens per second. One more draft
token, accepted with path probability ``P``, raises that rate only if ``P > (B + A) / (B + D + 1/verify_cost)``.
``A`` and ``D`` per request come from recent steps (exponential averages), so the bound follows the workload;
it depends only on the sequence of steps, never on timing, so every tensor-parallel rank drafts the same.
"""

from __future__ import annotations

from .config import AnpdParams
from . import kernels as K

_DECAY = 0.9  # weight of the past in the per-request averages (about the last ten steps)


class BatchBudget:
    def __init__(self, params: AnpdParams):
        self.params = params
        self.accepted_per_request = 0.0
        self.drafted_per_request = 0.0
        self._last_accepted_total = 0
        self._last_batch = 0
        self._pending_drafted = 0
        self.last_stop_probability = params.stop_probability

    def stop_probability(self, batch: int, tables) -> float:
        """The stop probability for this step's drafts (``params.stop_probability`` is the floor)."""
        accepted_total = int(tables.released_meta[K.META_ACCEPTED] + tables.meta[:, K.META_ACCEPTED].sum())
        if self._last_batch:
            # Feedback for last step's drafts arrives in this step's update; the kernel counts it there.
            # Released slots keep their counts in released_meta, so the total never goes backwards.
            accepted = max(0, accepted_total - self._last_accepted_total) / self._last_batch
            drafted = self._pending_drafted / self._last_batch
            self.accepted_per_request = _DECAY * self.accepted_per_request + (1 - _DECAY) * accepted
            self.drafted_per_request = _DECAY * self.drafted_per_request + (1 - _DECAY) * drafted
        self._last_accepted_total = accepted_total
        self._last_batch = batch
        floor = self.params.stop_probability
        cost = self.params.verify_cost
        if cost <= 0.0 or batch <= 0:
            self.last_stop_probability = floor
        else:
            bound = (1.0 + self.accepted_per_request) / (1.0 + self.drafted_per_request + 1.0 / (cost * batch))
            self.last_stop_probability = min(0.99, max(floor, bound))
        return self.last_stop_probability

    def drafted(self, num_tokens: int) -> None:
        self._pending_drafted = num_tokens
