"""Spec-Bench prompts (the standard speculative-decoding benchmark, 13 categories), shared by the
benchmarks, the examples and the end-to-end tests.

The data file is looked up in ``$VLLM_ANPD_SPEC_BENCH`` or ``../shared/data/spec_bench/question.jsonl``
next to the repository.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    text: str  # first turn


def data_path() -> Path:
    env = os.environ.get("VLLM_ANPD_SPEC_BENCH")
    if env:
        return Path(env)
    tried = []
    for base in (Path.cwd(), _REPO):
        path = base.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
        if path.exists():
            return path
        tried.append(str(path))
    raise FileNotFoundError(
        f"Spec-Bench question.jsonl not found (looked at {' and '.join(dict.fromkeys(tried))}): set "
        "VLLM_ANPD_SPEC_BENCH or place shared/ beside the repo")


def load_questions(path: Path | None = None) -> list[Question]:
    out = []
    with open(path or data_path()) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.append(Question(int(row["question_id"]), row["category"], row["turns"][0]))
    return out


def stratified(questions: list[Question], per_category: int) -> list[Question]:
    """The first ``per_category`` questions of each category, in file order (deterministic)."""
    taken: dict[str, int] = defaultdict(int)
    out = []
    for q in questions:
        if taken[q.category] < per_category:
            taken[q.category] += 1
            out.append(q)
    return out


def chat_prompt(tokenizer, text: str) -> str:
    """The instruct model's chat template around one user turn."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
