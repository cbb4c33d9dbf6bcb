"""``FixedLengthProposer``: drafts a fixed, cycling schedule of draft lengths, for calibrating what a step
costs as a function of its draft tokens (``benchmarks/calibrate_cost.py --drafts``). Benchmark use only.

    {"method": "custom_class", "model": "vllm_anpd.bench.fixed_length_proposer.FixedLengthProposer",
     "num_speculative_tokens": 5}     with  VLLM_ANPD_DRAFT_SCHEDULE="0,1,2,3,5"

A request whose context holds ``n`` tokens gets ``schedule[n % len(schedule)]`` draft tokens, all equal
to token id 0, so they are rejected and every step adds exactly one token per request: the schedule advances
one entry per step, and the step that verifies a draft costs what verifying that many tokens costs.
"""

from __future__ import annotations

import os

ENV = "VLLM_ANPD_DRAFT_SCHEDULE"


class FixedLengthProposer:
    def __init__(self, vllm_config):
        k = vllm_config.speculative_config.num_speculative_tokens
        self.schedule = [int(x) for x in os.environ.get(ENV, "0").split(",")]
        if any(not 0 <= d <= k for d in self.schedule):
            raise ValueError(f"{ENV}={os.environ.get(ENV)!r}: every length must be in [0, {k}]")

    def load_model(self, *args, **kwargs):
        pass

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **_):
        n = len(self.schedule)
        return [[0] * self.schedule[int(num_tokens_no_spec[i]) % n] if sampled else []
                for i, sampled in enumerate(sampled_token_ids)]
