"""The offline example's prompts: Spec-Bench when it is beside the repository, built-in prompts otherwise,
read before any engine starts (no engine here)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def example():
    path = Path(__file__).resolve().parents[1] / "examples" / "offline_inference.py"
    spec = importlib.util.spec_from_file_location("offline_inference_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its main() is behind the __main__ guard
    return module


def test_example_spreads_spec_bench_prompts_over_the_categories(example):
    questions = example.load_prompts(26)
    assert len(questions) == 26 and all(q.question_id >= 0 for q in questions)
    assert Counter(q.category for q in questions) == Counter({c: 2 for c in {q.category for q in questions}})
    assert len({q.category for q in questions}) == 13


def test_example_without_spec_bench_uses_its_built_in_prompts(example, monkeypatch, tmp_path, capsys):
    missing = tmp_path / "question.jsonl"
    monkeypatch.setenv("VLLM_ANPD_SPEC_BENCH", str(missing))
    assert example.load_prompts(26) == example.BUILT_IN_PROMPTS
    assert example.load_prompts(2) == example.BUILT_IN_PROMPTS[:2]
    out = capsys.readouterr().out
    assert str(missing) in out and "built-in prompts" in out
