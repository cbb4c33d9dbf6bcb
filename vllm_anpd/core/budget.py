"""Batch-aware draft budget: how sure a draft token must be to pay for its verification.

With ``step time = a + b x tokens`` and ``verify_cost = b / a``, a batch of ``B`` requests that drafts
``D`` tokens and gets ``A`` accepted yields ``(B + A) / (a + b (B + D))`` tokens per second. One more draft
token, accepted with path probability ``P``, raises that rate only if ``P > (B + A) / (B + D + 1/verify_cost)``.
``A`` and ``D`` per request come from recent steps (exponential averages), so the bound follows the workload.

``verify_cost`` is hardware- and model-specific (about 0.07 for SmolLM2-135M on vLLM CPU, near 0 for a GPU at
small batch), so by default ``StepCostModel`` measures it on the running engine: the time between two
``propose`` calls is one engine step, whose token count the proposer knows (rows + the draft tokens it
proposed). Tensor-parallel ranks may measure slightly different costs and draft differently; that is harmless,
because vLLM takes the drafts of one rank only (``take_draft_token_ids`` from the executor's output rank) and
sends those to every rank for verification.
"""

from __future__ import annotations

from .config import AnpdParams

_DECAY = 0.9  # weight of the past in the per-request averages (about the last ten steps)


# Step-time regression: exponential forgetting over about the last 200 decode steps.
_COST_DECAY = 0.995
MIN_COST_STEPS = 64  # decode steps seen before the measured cost replaces the configured one
_MIN_TOKEN_SPREAD = 0.02  # std of the token count over its mean: below it the slope is not identifiable
_OUTLIER_FACTOR = 4.0  # a step slower than this many times the fitted time is a pause, not a step


class StepCostModel:
    """Least-squares fit of ``step seconds = a + b x tokens`` over recent decode steps; ``verify_cost`` is
    ``b / a``, or ``prior`` until the fit is trustworthy.

    Trustworthy: at least ``MIN_COST_STEPS`` steps, enough spread in their token counts for the slope to be
    identifiable, and ``a > 0``. A negative slope (timing noise on a flat cost) measures 0. To stay on the safe
    side of the break-even bound, the value used is the estimate plus one standard error: an overestimate
    costs a few draft tokens, an underestimate could make speculation slower than none at high batch.
    """

    def __init__(self, prior: float):
        self.prior = float(prior)
        self.steps = 0
        self._w = self._t = self._tt = self._y = self._ty = self._yy = 0.0
        self.a = self.b = None  # fitted seconds per step and per token, once trustworthy

    def observe(self, seconds: float, tokens: int) -> None:
        if seconds <= 0.0 or tokens <= 0:
            return
        if self.a is not None and seconds > _OUTLIER_FACTOR * (self.a + self.b * tokens):
            return
        d = _COST_DECAY
        t, y = float(tokens), float(seconds)
        self._w = d * self._w + 1.0
        self._t = d * self._t + t
        self._tt = d * self._tt + t * t
        self._y = d * self._y + y
        self._ty = d * self._ty + t * y
        self._yy = d * self._yy + y * y
        self.steps += 1
        self._fit()

    def _fit(self) -> None:
        w = self._w
        mean_t, mean_y = self._t / w, self._y / w
        var_t = max(self._tt / w - mean_t * mean_t, 0.0)
        if self.steps < MIN_COST_STEPS or var_t < (_MIN_TOKEN_SPREAD * mean_t) ** 2:
            return
        cov = self._ty / w - mean_t * mean_y
        b = max(cov / var_t, 0.0)
        a = mean_y - b * mean_t
        if a <= 0.0:
            return
        var_y = max(self._yy / w - mean_y * mean_y, 0.0)
        residual = max(var_y - b * cov, 0.0)  # per-step variance around the line
        self.b_standard_error = (residual / (w * var_t)) ** 0.5
        self.a, self.b = a, b

    @property
    def verify_cost(self) -> float:
        if self.a is None:
            return self.prior
        return (self.b + self.b_standard_error) / self.a

    def as_dict(self) -> dict:
        return {"verify_cost": self.verify_cost, "measured": self.a is not None, "steps": self.steps,
                "step_seconds": self.a, "seconds_per_token": self.b}


class BatchBudget:
    def __init__(self, params: AnpdParams):
        self.params = params
        self.accepted_per_request = 0.0
        self.drafted_per_request = 0.0
        self._last_accepted_total = 0
        self._last_batch = 0
        self._pending_drafted = 0
        self.last_stop_probability = params.stop_probability

    def stop_probability(self, batch: int, tables, verify_cost: float | None = None) -> float:
        """The stop probability for this step's drafts (``params.stop_probability`` is the floor).
        ``verify_cost`` overrides ``params.verify_cost`` (the proposer passes the measured one)."""
        accepted_total = int(tables.accepted_total[0])
        if self._last_batch:
            # Feedback for last step's drafts arrives in this step's update; the kernel counts it there, in a
            # total over all requests that never goes backwards (released ones included).
            accepted = max(0, accepted_total - self._last_accepted_total) / self._last_batch
            drafted = self._pending_drafted / self._last_batch
            self.accepted_per_request = _DECAY * self.accepted_per_request + (1 - _DECAY) * accepted
            self.drafted_per_request = _DECAY * self.drafted_per_request + (1 - _DECAY) * drafted
        self._last_accepted_total = accepted_total
        self._last_batch = batch
        floor = self.params.stop_probability
        cost = self.params.verify_cost if verify_cost is None else verify_cost
        if self.params.verify_cost <= 0.0 or cost <= 0.0 or batch <= 0:
            self.last_stop_probability = floor
        else:
            bound = (1.0 + self.accepted_per_request) / (1.0 + self.drafted_per_request + 1.0 / (cost * batch))
            self.last_stop_probability = min(0.99, max(floor, bound))
        return self.last_stop_probability

    def drafted(self, num_tokens: int) -> None:
        self._pending_drafted = num_tokens
