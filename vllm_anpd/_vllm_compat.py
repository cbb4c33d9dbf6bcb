"""The only module that touches vLLM internals. Each hook names what it mirrors in vLLM 0.32.

Two things, both reversible and idempotent (CPU workers are spawned and run the plugin again):

1. ``install()`` swaps the ``SpeculativeConfig`` that ``vllm.engine.arg_utils.EngineArgs.
   create_speculative_config`` instantiates for ``AnpdSpeculativeConfig``: vLLM's class plus
   ``method: "anpd"`` and typed ``anpd_*`` fields. ``"anpd"`` is then routed through vLLM's own
   ``custom_class`` path (``vllm/v1/spec_decode/custom_class_proposer.py``) with ``AnpdProposer``, so the
   model runner, the scheduler and the V1/V2 runner choice need no patch.
2. The proposer reads request ids from the model runner that builds it (``find_constructing_runner``):
   ``custom_class`` passes rows, not request ids, and rows move every step (``InputBatch.condense``).
"""

# No "from __future__ import annotations" here: vLLM builds its CLI from the config class's annotations
# (EngineArgs.add_cli_args -> get_kwargs(SpeculativeConfig)) and needs real types, not strings.
import sys
from typing import Any, Literal

from vllm.config import SpeculativeConfig
from vllm.config.speculative import SpeculativeMethod
from vllm.config.utils import config

from .core.config import AnpdParams

METHOD = "anpd"
PROPOSER_PATH = "vllm_anpd.proposer.AnpdProposer"
PROPOSER_PATHS = (PROPOSER_PATH, "vllm_anpd.AnpdProposer")  # the second is the documented zero-patch route
OPTION_PREFIX = "anpd_"
_PARAM_FIELDS = [f for f in AnpdParams.field_names() if f != "num_speculative_tokens"]
_DEFAULTS = AnpdParams.__dataclass_fields__


def _default(name):
    return _DEFAULTS[name].default


@config
class AnpdSpeculativeConfig(SpeculativeConfig):
    """vLLM's ``SpeculativeConfig`` (``vllm/config/speculative.py``) plus ``method: "anpd"`` and its options.

    Extra keys stay forbidden (vLLM's ``@config`` sets ``extra="forbid"``); the ``anpd_*`` fields are
    type-checked by pydantic, then range-checked by ``AnpdParams``.
    """

    method: SpeculativeMethod | Literal["anpd"] | None = None
    anpd_n_min: int = _default("n_min")
    anpd_n_max: int = _default("n_max")
    anpd_min_count: int | list[int] = _default("min_count")
    anpd_min_share: float | list[float] = _default("min_share")
    anpd_stop_probability: float = _default("stop_probability")
    anpd_verify_cost: float = _default("verify_cost")
    anpd_max_entries_per_request: int = _default("max_entries_per_request")
    anpd_cross_request_entries: int = _default("cross_request_entries")
    anpd_cross_min_count: int = _default("cross_min_count")

    def __post_init__(self):
        options = {name: getattr(self, OPTION_PREFIX + name) for name in _PARAM_FIELDS}
        if self.method == METHOD:
            # Validate now, in the process that parsed the user's JSON, so a bad value fails start-up
            # with the field name instead of failing later inside a worker.
            params_from_options(options, self.num_speculative_tokens or 1)
            self.method = "custom_class"
            self.model = PROPOSER_PATH
        elif self.model not in PROPOSER_PATHS:
            changed = [OPTION_PREFIX + k for k, v in options.items() if v != _default(k)]
            if changed:
                raise ValueError(f"{', '.join(changed)}: options of method '{METHOD}', "
                                 f"but method is {self.method!r}")
        super().__post_init__()


def params_from_options(options: dict, num_speculative_tokens: int) -> AnpdParams:
    """``AnpdParams`` from option values, errors renamed to the ``anpd_*`` key the user wrote."""
    try:
        return AnpdParams(num_speculative_tokens=num_speculative_tokens, **options)
    except ValueError as e:
        msg = str(e)
        if any(msg.startswith(name) for name in _PARAM_FIELDS):
            msg = OPTION_PREFIX + msg
        raise ValueError(f"speculative_config: {msg}") from None


def params_from_speculative_config(spec: Any) -> AnpdParams:
    """ANPD parameters from a (possibly plain, for the ``custom_class`` route) vLLM ``SpeculativeConfig``."""
    options = {name: getattr(spec, OPTION_PREFIX + name, _default(name)) for name in _PARAM_FIELDS}
    return params_from_options(options, spec.num_speculative_tokens)


def install() -> None:
    """Make ``EngineArgs.create_speculative_config`` build ``AnpdSpeculativeConfig``. Idempotent."""
    import vllm.engine.arg_utils as arg_utils

    if arg_utils.SpeculativeConfig is not AnpdSpeculativeConfig:
        arg_utils.SpeculativeConfig = AnpdSpeculativeConfig


def uninstall() -> None:
    import vllm.engine.arg_utils as arg_utils

    arg_utils.SpeculativeConfig = SpeculativeConfig


def is_installed() -> bool:
    import vllm.engine.arg_utils as arg_utils

    return arg_utils.SpeculativeConfig is AnpdSpeculativeConfig


# --- what the proposer reads from the model runner ---------------------------------------------------

def find_constructing_runner():
    """The ``GPUModelRunner`` (or ``CPUModelRunner``, its subclass) whose ``__init__`` is building us.

    Mirrors ``GPUModelRunner.__init__`` -> ``create_custom_proposer(vllm_config)`` -> ``cls(vllm_config)``.
    Returns None when the proposer is built outside a runner (unit tests, other vLLM versions).
    """
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, GPUModelRunner):
            return obj
        frame = frame.f_back
    return None


def batch_request_ids(runner) -> list | None:
    """Request id of each batch row: ``runner.input_batch.req_ids`` (``v1/worker/gpu_input_batch.py``)."""
    batch = getattr(runner, "input_batch", None)
    return None if batch is None else batch.req_ids


def stats_log_interval() -> float:
    """vLLM's stat-logging interval in seconds (``vllm.envs.VLLM_LOG_STATS_INTERVAL``)."""
    try:
        import vllm.envs as envs

        return float(envs.VLLM_LOG_STATS_INTERVAL)
    except Exception:
        return 10.0


def batch_prompt_lengths(runner):
    """Prompt length of each batch row: ``runner.input_batch.num_prompt_tokens``."""
    return runner.input_batch.num_prompt_tokens


def live_requests(runner) -> dict | None:
    """``runner.requests``: request id -> ``CachedRequestState`` for every unfinished request, preempted
    ones included; ``GPUModelRunner._update_states`` pops finished ids before the step's drafting."""
    return getattr(runner, "requests", None)


def drafter_stats(worker) -> dict | None:
    """For ``LLM.collective_rpc``: the ANPD proposer's statistics in a worker (``worker.model_runner.drafter``),
    or None if that worker has no ANPD proposer."""
    from .proposer import AnpdProposer

    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    if not isinstance(drafter, AnpdProposer):
        return None
    return drafter.stats()


def time_drafter(worker) -> bool:
    """For ``LLM.collective_rpc``: wrap this worker's drafter's ``propose`` (on the instance, not the class)
    to accumulate its wall time; ``drafter_seconds`` reads it. Works for any proposer (ngram, suffix, anpd)."""
    import time

    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    if drafter is None or getattr(drafter, "_anpd_timed", False):
        return drafter is not None
    inner = drafter.propose
    drafter._anpd_seconds = 0.0

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            drafter._anpd_seconds += time.perf_counter() - t0

    drafter.propose = timed
    drafter._anpd_timed = True
    return True


def drafter_seconds(worker) -> float | None:
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    return getattr(drafter, "_anpd_seconds", None)
