"""Chat, ShareGPT, alpaca and raw-text records: detection, normalisation, every problem reported."""

from __future__ import annotations

import json

import pytest
from llm_fixtures import CHAT, write_jsonl

from loracli.errors import LoraError
from loracli.llm import data


def test_every_shape_is_detected_and_normalised(tmp_path):
    write_jsonl(tmp_path / "d" / "chat.jsonl", CHAT)
    write_jsonl(tmp_path / "d" / "sub" / "raw.jsonl", [{"text": "hello world"}])
    examples = data.load(tmp_path / "d")
    assert data.kinds(examples) == {"chat": 2, "instruction": 2, "text": 1}
    share = examples[1]
    assert share.messages == ({"role": "user", "content": "Name a colour"},
                              {"role": "assistant", "content": "Blue, like the sea."})
    alpaca = examples[3]
    assert [m["role"] for m in alpaca.messages] == ["system", "user", "assistant"]
    assert alpaca.messages[1]["content"] == "Summarise\n\nThe meeting moved to Tuesday."
    assert examples[2].messages[0]["content"] == "Translate hello into French"  # empty input
    assert examples[4].kind == "text" and examples[4].text == "hello world"
    assert examples[0].source.endswith("chat.jsonl:1")


def test_json_file_with_a_list_of_records(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "one"},\n\n  {"text":\n "two"},\n  {"bad": 1}\n]', "utf-8")
    with pytest.raises(LoraError) as e:
        data.load(path)
    assert e.value.details[0].startswith(f"{path}:6: no 'messages'")
    path.write_text(json.dumps(CHAT, indent=2), "utf-8")
    examples = data.load(path)
    assert [e.kind for e in examples] == ["chat", "chat", "instruction", "instruction"]


def test_all_bad_lines_are_reported_at_once_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps(CHAT[0]),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
        "",
        json.dumps({"instruction": "do it"}),
        json.dumps({"prompt": "x", "completion": "y"}),
        json.dumps(["a list"]),
    ]) + "\n", "utf-8")
    with pytest.raises(LoraError) as e:
        data.load(path)
    err = e.value
    assert "6 problems" in err.message
    lines = [d.split(": ", 1)[0] for d in err.details]
    assert lines == [f"{path}:{n}" for n in (2, 3, 4, 6, 7, 8)]
    assert "no assistant message" in err.details[1]
    assert "'robot' is not one of system, user, assistant" in err.details[2]
    assert "'output' must be a non-empty string" in err.details[3]
    assert "keys: completion, prompt" in err.details[4]
    assert "lora train" in err.hint


def test_forced_format_rejects_other_shapes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, CHAT[0]])
    with pytest.raises(LoraError) as e:
        data.load(path, format="text")
    assert e.value.details == [f"{path}:2: a chat record, but data.format is 'text'"]
    assert len(data.load(path, format="auto")) == 2


def test_missing_empty_and_wrong_paths(tmp_path):
    with pytest.raises(LoraError, match="no such data file"):
        data.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraError, match="no .jsonl or .json files"):
        data.load(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(LoraError, match="not a .jsonl or .json file"):
        data.load(tmp_path / "x.csv")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(LoraError) as e:
        data.load(tmp_path / "bin.jsonl")
    assert "not UTF-8" in e.value.details[0]


def test_a_link_out_of_the_data_folder_is_refused(tmp_path):
    outside = write_jsonl(tmp_path / "secret.jsonl", [{"text": "x"}])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link.jsonl").symlink_to(outside)
    with pytest.raises(LoraError, match="links outside the data folder"):
        data.load(tmp_path / "d")


def test_split_is_seeded_and_disjoint():
    items = list(range(40))
    train, held = data.split(items, 0.1, seed=3)
    assert len(held) == 4 and sorted(train + held) == items
    assert data.split(items, 0.1, seed=3) == (train, held)
    assert data.split(items, 0.1, seed=4)[1] != held
    assert data.split([1], 0.5, seed=0) == ([1], [])
    assert data.split(items, 0.0, seed=0) == (items, [])
