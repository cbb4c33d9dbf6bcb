"""The ``--anpd`` JSON option of the benchmark scripts, parsed and checked where argparse reads it.

``replay.py``, ``step_cost.py`` and ``core_ab.py`` take ``AnpdParams`` field names (``{"n_max": 5}``);
``engine_bench.py`` takes the plugin's ``speculative_config`` keys (``{"anpd_n_max": 5}``). Either way a
malformed JSON, a key that is not an option, or a value out of range is refused before any work starts, with a
message that quotes what was given (argparse's ``argument --anpd: ...``, exit code 2), instead of a traceback
minutes later or inside an engine's worker process. ``num_speculative_tokens`` is each script's own option.
"""

from __future__ import annotations

import argparse
import json

from vllm_anpd.core.config import OPTION_PREFIX, AnpdParams


def _parse(text: str, prefix: str) -> dict:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e})") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object, e.g. '{{\"{prefix}n_max\": 5}}'")
    allowed = [prefix + name for name in AnpdParams.option_names()]
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown key(s) {', '.join(map(repr, unknown))}; "
                                         f"expected some of {', '.join(allowed)}")
    try:
        AnpdParams.from_options({key[len(prefix):]: value for key, value in options.items()}, prefix)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return options


def anpd_overrides(text: str) -> dict:
    """argparse ``type`` for ``AnpdParams`` overrides: ``'{"stop_probability": 0.1}'`` -> a checked dict."""
    return _parse(text, "")


def anpd_speculative_options(text: str) -> dict:
    """argparse ``type`` for the plugin's ``anpd_*`` speculative_config keys, checked the same way."""
    return _parse(text, OPTION_PREFIX)
