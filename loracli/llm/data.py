"""Training text for causal LMs: `.jsonl`/`.json` files (or a folder of them) → examples.

Three shapes are understood, detected per record (or forced with `data.format`):
  chat         {"messages": [{"role": "user", "content": "…"}, …]}   (OpenAI style)
               {"conversations": [{"from": "human", "value": "…"}, …]} (ShareGPT)
  instruction  {"instruction": "…", "input": "…", "output": "…", "system": "…"} (alpaca)
  text         {"text": "…"}
Chat and instruction records both become a list of messages; text stays text. Every bad record
is reported with its file and line (1-based), all of them at once, in one `LoraError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loracli.errors import LoraError

FORMATS = ("auto", "chat", "instruction", "text")
SUFFIXES = (".jsonl", ".json")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant", "model": "assistant"}
MAX_DETAILS = 50


@dataclass(frozen=True)
class Example:
    source: str                          # "file.jsonl:12" (where a problem would be reported)
    kind: str                            # "chat" | "instruction" | "text"
    messages: tuple = ()                 # ({"role", "content"}, …) for chat and instruction
    text: str = ""                       # for text


def files(path: str | Path) -> list[Path]:
    """The data files: `path` itself, or every .jsonl/.json below a folder (sorted)."""
    root = Path(path).expanduser()
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise LoraError(f"{root}: not a .jsonl or .json file",
                            "point data.dir at a .jsonl/.json file or a folder of them")
        return [root]
    if not root.is_dir():
        raise LoraError(f"{root}: no such data file or folder",
                        f"check data.dir, e.g. `lora train --set data.dir=./data/chat.jsonl`")
    real = root.resolve()
    found = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in SUFFIXES and p.is_file() and not p.name.startswith("."):
            if not p.resolve().is_relative_to(real):  # a symlink out of the data folder
                raise LoraError(f"{p}: links outside the data folder {root}",
                                "copy the file into the folder instead of linking to it")
            found.append(p)
    if not found:
        raise LoraError(f"{root}: no .jsonl or .json files in it",
                        "put training records in e.g. data/train.jsonl (one JSON object per line)")
    return found


def _records(path: Path, problems: list[str]):
    """(line number, record) for every record of one file; parse problems are appended."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        problems.append(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
        return
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except ValueError as e:
                    problems.append(f"{path}:{number}: not valid JSON ({e})")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(f"{path}:{e.lineno}: not valid JSON ({e.msg})")
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        problems.append(f"{path}: a .json data file must hold a list of records")
        return
    starts = _record_lines(text, len(data))
    for i, record in enumerate(data):
        yield starts[i], record


def _record_lines(text: str, count: int) -> list[int]:
    """The line on which each top-level list element starts (for messages about .json files)."""
    decoder = json.JSONDecoder()
    lines, pos = [], text.index("[") + 1
    for _ in range(count):
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)
    return lines


def detect(record: dict) -> str | None:
    if "messages" in record or "conversations" in record:
        return "chat"
    if "instruction" in record:
        return "instruction"
    if "text" in record:
        return "text"
    return None


def _chat(record: dict) -> tuple[tuple, str | None]:
    if "messages" in record:
        turns, role_key, text_key, roles = record["messages"], "role", "content", None
    else:
        turns, role_key, text_key, roles = record["conversations"], "from", "value", SHAREGPT_ROLES
    if not isinstance(turns, list) or not turns:
        return (), "messages must be a non-empty list"
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return (), f"message {i + 1} is not an object"
        role, content = turn.get(role_key), turn.get(text_key)
        role = roles.get(role, role) if roles else role
        if role not in ROLES:
            allowed = ", ".join(roles or ROLES)
            return (), f"message {i + 1}: {role_key} {turn.get(role_key)!r} is not one of {allowed}"
        if not isinstance(content, str):
            return (), f"message {i + 1}: {text_key} must be a string"
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        return (), "no assistant message with text (nothing to learn from)"
    return tuple(out), None


def _instruction(record: dict) -> tuple[tuple, str | None]:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return (), f"{key!r} must be a non-empty string"
    for key in ("input", "system"):
        if record.get(key) is not None and not isinstance(record[key], str):
            return (), f"{key!r} must be a string"
    prompt = record["instruction"]
    if (record.get("input") or "").strip():
        prompt += "\n\n" + record["input"]
    messages = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": record["output"]}]
    if (record.get("system") or "").strip():
        messages.insert(0, {"role": "system", "content": record["system"]})
    return tuple(messages), None


def parse(record, source: str, format: str = "auto") -> tuple[Example | None, str | None]:
    """One record → (Example, None), or (None, what is wrong with it)."""
    if not isinstance(record, dict):
        return None, "a record must be a JSON object"
    kind = detect(record)
    if kind is None:
        return None, ("no 'messages', 'conversations', 'instruction' or 'text' key "
                      f"(keys: {', '.join(sorted(record)) or 'none'})")
    if format != "auto" and kind != format:
        return None, f"a {kind} record, but data.format is {format!r}"
    if kind == "text":
        if not isinstance(record["text"], str) or not record["text"].strip():
            return None, "'text' must be a non-empty string"
        return Example(source, "text", text=record["text"]), None
    messages, problem = _chat(record) if kind == "chat" else _instruction(record)
    return (None, problem) if problem else (Example(source, kind, messages), None)


def load(path: str | Path, format: str = "auto") -> list[Example]:
    """Every example under `path`, in file and line order; all problems raised together."""
    if format not in FORMATS:
        raise LoraError(f"unknown data format {format!r}",
                        "set data.format to " + " | ".join(FORMATS))
    examples, problems = [], []
    for f in files(path):
        for line, record in _records(f, problems):
            example, problem = parse(record, f"{f}:{line}", format)
            if problem:
                problems.append(f"{f}:{line}: {problem}")
            else:
                examples.append(example)
    if problems:
        shown = problems[:MAX_DETAILS]
        if len(problems) > MAX_DETAILS:
            shown.append(f"… and {len(problems) - MAX_DETAILS} more")
        raise LoraError(
            f"{len(problems)} problem{'s' * (len(problems) != 1)} in the training data at {path}",
            "fix the records listed (chat: {\"messages\": [{\"role\": \"user\", \"content\": …}, "
            "{\"role\": \"assistant\", …}]}; alpaca: {\"instruction\", \"output\"}; raw: "
            "{\"text\"}), then run `lora train` again", details=shown)
    if not examples:
        raise LoraError(f"{path}: no training records in it",
                        "add one JSON object per line to a .jsonl file")
    return examples


def kinds(examples: list[Example]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        out[e.kind] = out.get(e.kind, 0) + 1
    return out


def split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded choice of round(fraction × n) examples, at least one when
    fraction > 0 and there are two or more; both lists keep the original order."""
    import numpy as np

    n = len(examples)
    held = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0
    chosen = set(np.random.default_rng([seed, 7]).permutation(n)[:held].tolist())
    return ([e for i, e in enumerate(examples) if i not in chosen],
            [e for i, e in enumerate(examples) if i in chosen])


def fingerprint(path: str | Path) -> str:
    """A hash of the data files' names and contents (a resumed run warns when it changed)."""
    import hashlib

    h = hashlib.sha256()
    for f in files(path):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def recorded_fingerprint(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / "dataset.json").read_text("utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None
