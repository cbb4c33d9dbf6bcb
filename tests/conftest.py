"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import threading

import pytest


@pytest.fixture
def run_bound_to_one_cpu():
    """``run(fn)``: ``fn()``'s result, computed in a new thread bound to one CPU (as vLLM's CPU worker binds
    its main thread; the binding is the thread's own, the test process keeps its CPUs)."""

    def run(fn):
        out = {}

        def target():
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # this thread only
            out["value"] = fn()

        t = threading.Thread(target=target)
        t.start()
        t.join()
        return out["value"]

    return run


@pytest.fixture
def restored_environ():
    """The process environment as it was before the test, restored after it: for tests of code that sets
    variables in ``os.environ`` (for the engine processes it starts to inherit). ``monkeypatch.delenv`` of a
    variable that is absent records nothing to undo, so a value the code sets afterwards would outlive the
    test, and every engine that later tests start would inherit it. Ask for it before ``monkeypatch``, so that it
    is restored last."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
