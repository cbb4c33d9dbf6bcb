"""ANPD drafting parameters, validated. Pure Python: no vLLM, no numba.

The plugin exposes every field here in vLLM's ``--speculative-config`` JSON under the name
``anpd_<field>`` (see ``vllm_anpd/_vllm_compat.py``), except ``num_speculative_tokens`` which is vLLM's own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

# Upper bounds are sanity limits, not tuning advice: larger values only waste memory and time.
MAX_SPECULATIVE_TOKENS = 128
MAX_NGRAM = 16
OPTION_PREFIX = "anpd_"  # a field's key in vLLM's speculative_config JSON: anpd_<field>


def _as_tuple(name: str, value, num_levels: int, cast) -> tuple:
    """A per-level threshold may be given once (applies to every level) or as one value per level."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return tuple(cast(value) for _ in range(num_levels))
    if isinstance(value, (list, tuple)):
        if len(value) != num_levels:
            raise ValueError(
                f"{name}={list(value)!r}: expected one value or {num_levels} values "
                f"(one per level n_min..n_max)")
        return tuple(cast(v) for v in value)
    raise ValueError(f"{name}={value!r}: expected a number or a list of {num_levels} numbers")


@dataclass(frozen=True)
class AnpdParams:
    """Everything that decides what ANPD drafts. Defaults were chosen with the replay simulator on all 480
    Spec-Bench prompts (benchmarks/replay.py, BENCHMARKS.md); ``PAPER`` below turns the extensions off.

    Levels: for each n in ``n_min..n_max`` a table maps the last ``n - 1`` tokens to next-token counts.
    Drafting queries the highest level whose key was seen, backs off to lower levels, and chains.

    Confidence gate (per level, from highest n to lowest): the top successor of a key is used only if its
    count is ``>= min_count`` and its share of all successors of that key is ``>= min_share``; otherwise
    the next lower level is tried, and the draft stops when no level passes.

    Adaptive length: each drafted token gets an estimated acceptance probability from its level and
    count (learned online from what the target model accepted); the draft stops once the probability
    that the whole draft so far is accepted falls below ``stop_probability``. ``0`` disables this.

    Batch-aware budget: ``verify_cost`` is the target's cost of verifying one more token, relative to the
    fixed cost of an engine step (``b / a`` in ``step time = a + b x tokens``; near 0 on a GPU at small
    batch, large on a CPU or a compute-bound GPU batch). A draft token with path probability ``P`` raises
    throughput only if ``P > (B + A) / (B + D + 1 / verify_cost)`` for a batch of ``B`` requests expected to
    accept ``A`` of ``D`` draft tokens; the proposer raises the stop probability to that bound each step.
    ``0`` disables it. With ``measure_verify_cost`` (default) the proposer measures ``b / a`` from the engine's
    own decode-step times and uses that once it is reliable (after some 64 decode steps); ``verify_cost`` is
    the value used until then. Without it, ``verify_cost`` is used as given.

    Cross-request table: the tokens that requests generate are also counted in one table shared by all
    requests (bounded by ``cross_request_entries`` n-gram entries, cleared and restarted when full). A draft
    token comes from it when none of the request's own levels passes the gate, or when only the lowest ones
    do and its candidate has the better learned acceptance estimate; always only if that successor was seen
    ``cross_min_count`` times. Helps repeated templates, answers and code across requests.
    """

    num_speculative_tokens: int = 8
    n_min: int = 2
    n_max: int = 7
    min_count: tuple = 1
    min_share: tuple = 0.0
    stop_probability: float = 0.05
    verify_cost: float = 0.07
    measure_verify_cost: bool = True
    max_entries_per_request: int = 0  # 0: tables grow with the context (bounded by max_model_len)
    cross_request_entries: int = 262144  # 0: off; else the bound of the table shared across requests
    cross_min_count: int = 2  # the shared table's gate: a successor seen at least this often

    def __post_init__(self):
        def check_int(name, value, lo, hi):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name}={value!r}: must be an integer in [{lo}, {hi}]")

        check_int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        check_int("n_min", self.n_min, 1, MAX_NGRAM)
        check_int("n_max", self.n_max, self.n_min, MAX_NGRAM)
        check_int("max_entries_per_request", self.max_entries_per_request, 0, 2**30)
        check_int("cross_request_entries", self.cross_request_entries, 0, 2**30)
        check_int("cross_min_count", self.cross_min_count, 1, 2**30)
        levels = self.num_levels
        min_count = _as_tuple("min_count", self.min_count, levels, _strict_int("min_count"))
        min_share = _as_tuple("min_share", self.min_share, levels, float)
        for c in min_count:
            if not 1 <= c <= 2**30:
                raise ValueError(f"min_count={list(min_count)!r}: every value must be in [1, 2**30]")
        for s in min_share:
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"min_share={list(min_share)!r}: every value must be in [0.0, 1.0]")
        p = self.stop_probability
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"stop_probability={p!r}: must be a number in [0.0, 1.0)")
        c = self.verify_cost
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= c <= 1000.0:
            raise ValueError(f"verify_cost={c!r}: must be a number in [0.0, 1000.0]")
        object.__setattr__(self, "verify_cost", float(c))
        if not isinstance(self.measure_verify_cost, bool):
            raise ValueError(f"measure_verify_cost={self.measure_verify_cost!r}: must be true or false")
        object.__setattr__(self, "min_count", min_count)
        object.__setattr__(self, "min_share", min_share)
        object.__setattr__(self, "stop_probability", float(p))

    @property
    def num_levels(self) -> int:
        return self.n_max - self.n_min + 1

    def replace(self, **changes) -> "AnpdParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> Sequence[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def option_names(cls) -> Sequence[str]:
        """The fields a user sets as options (``anpd_<field>`` in vLLM's speculative_config): all but
        ``num_speculative_tokens``, which is vLLM's own."""
        return [name for name in cls.field_names() if name != "num_speculative_tokens"]

    @classmethod
    def from_options(cls, options: dict, prefix: str = OPTION_PREFIX, **fields) -> "AnpdParams":
        """``AnpdParams`` from options keyed by field name (``fields``: the others, e.g. num_speculative_tokens).
        A ``ValueError`` about an option names it as the user wrote it: ``prefix`` + the field's name."""
        try:
            return cls(**options, **fields)
        except ValueError as e:
            msg = str(e)
            if any(msg.startswith(name) for name in cls.option_names()):
                raise ValueError(prefix + msg) from None
            raise


# The paper's ANPD: fixed draft length (k), no gate, no adaptive stop, no shared table; N = 5.
PAPER = dict(n_min=2, n_max=5, min_count=1, min_share=0.0, stop_probability=0.0, verify_cost=0.0,
             cross_request_entries=0)


def _strict_int(name):
    def cast(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}: {v!r} is not an integer")
        return v
    return cast


__all__ = ["AnpdParams", "MAX_SPECULATIVE_TOKENS", "MAX_NGRAM", "OPTION_PREFIX", "PAPER"]
