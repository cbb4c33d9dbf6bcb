"""``OracleProposer``: drafts the true greedy continuation (from a run without speculation): the ceiling
of any drafter at a given k. Benchmark use only.

    {"method": "custom_class", "model": "vllm_anpd.bench.oracle_proposer.OracleProposer",
     "num_speculative_tokens": 5}     with  VLLM_ANPD_ORACLE_REFS=/path/to/references.jsonl

The references file has one JSON object per line with ``prompt_ids`` and ``output_ids``. Requests are
recognised by their prompt (``input_batch.num_prompt_tokens`` tells its length).
"""

from __future__ import annotations

import json
import os

from .. import _vllm_compat

ENV = "VLLM_ANPD_ORACLE_REFS"


class OracleProposer:
    def __init__(self, vllm_config):
        path = os.environ.get(ENV)
        if not path:
            raise ValueError(f"{ENV} must name a references JSONL file for the oracle proposer")
        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self._path = path
        self.reset()
        self._runner = _vllm_compat.find_constructing_runner()
        if self._runner is None:
            raise RuntimeError("OracleProposer must be built by a vLLM model runner")

    def reset(self) -> None:
        """(Re)read the references file: a benchmark rewrites it between phases of one engine."""
        self.refs = {}
        with open(self._path) as f:
            for line in f:
                r = json.loads(line)
                self.refs[tuple(r["prompt_ids"])] = r["output_ids"]

    def load_model(self, *args, **kwargs):
        pass

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **_):
        prompt_lens = _vllm_compat.batch_prompt_lengths(self._runner)
        drafts = []
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            p = int(prompt_lens[i])
            ref = self.refs.get(tuple(token_ids_cpu[i, :p].tolist())) if sampled else None
            if ref is None:
                drafts.append([])
                continue
            g = n - p
            k = max(0, min(self.k, self.max_model_len - n - 1))
            drafts.append(list(ref[g:g + k]))
        return drafts
