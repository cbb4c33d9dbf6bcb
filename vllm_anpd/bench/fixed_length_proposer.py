"""``FixedLengthProposer``: drafts a fixed, cycling schedule of draft lengths, for calibrating what a step
costs as a function of its draft tokens (``benchmarks/calibrate_cost.py --drafts``). Benchmark use only.

    {"method": "custom_class", "model": "vllm_anpd.bench.fixed_length_proposer.FixedLengthProposer",
     "num_speculative_tokens": 5}     with  VLLM_ANPD_DRAFT_SCHEDULE="0,1,2,3,5"

Every row of a step gets the same number of draft tokens, ``schedule[n % len(schedule)]`` where ``n`` is the
longest context among the rows that sampled a token, all equal to token id 0, so they are rejected and every
step adds exactly one token per request: the schedule advances one entry per step, and the step that
verifies a draft costs what verifying that many tokens per row costs. One length for the whole step, not
one per row's own context: rows at different context lengths (requests whose prefills finished in different
steps, say) would otherwise draft different lengths in the same step, and a step's time could not be labelled
with one length.
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

    def draft_length(self, sampled_token_ids, num_tokens_no_spec) -> int:
        """This step's draft length (see the module's docstring)."""
        longest = max((int(num_tokens_no_spec[i]) for i, s in enumerate(sampled_token_ids) if len(s)), default=0)
        return self.schedule[longest % len(self.schedule)]

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **_):
        draft = [0] * self.draft_length(sampled_token_ids, num_tokens_no_spec)
        return [list(draft) if len(sampled) else [] for sampled in sampled_token_ids]
