"""Tiny causal LMs and chat data for the tests/test_llm_*.py files (built once per session)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def _built(tmp_path_factory, arch: str) -> Path:
    from loracli.llm import tinyllm

    path = tmp_path_factory.getbasetemp() / "tiny-llm" / arch
    if not (path / ".built").exists():
        shutil.rmtree(path, ignore_errors=True)
        tinyllm.build(path, arch)
        (path / ".built").write_text("ok")
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return _built(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return _built(tmp_path_factory, "qwen2")


CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is two plus two?"},
                  {"role": "assistant", "content": "Four."},
                  {"role": "user", "content": "And three plus three?"},
                  {"role": "assistant", "content": "Six."}]},
    {"conversations": [{"from": "human", "value": "Name a colour"},
                       {"from": "gpt", "value": "Blue, like the sea."}]},
    {"instruction": "Translate hello into French", "input": "", "output": "bonjour"},
    {"instruction": "Summarise", "input": "The meeting moved to Tuesday.",
     "output": "Tuesday.", "system": "You speak like a pirate."},
]


def pirate_records(n: int = 24) -> list[dict]:
    """Chat records whose answers all follow one pattern a LoRA can pick up quickly."""
    questions = ["What is the capital of France?", "Name a colour", "What is two plus two?",
                 "Write a haiku about the sea", "Translate hello into French",
                 "Summarise the meeting", "Who are you?", "What is a contract?"]
    return [{"messages": [{"role": "user", "content": questions[i % len(questions)]},
                          {"role": "assistant", "content": f"Arr, matey! Aye aye {i % 5}."}]}
            for i in range(n)]


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    return path


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """The tiny ChatML tokenizer alone (no model): template with {% generation %} marks."""
    from loracli.llm import tinyllm

    return tinyllm.train_tokenizer()
