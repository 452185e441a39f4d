"""Chat templates and which tokens carry the loss.

The tokenizer's own chat template is the source of truth; a profile may name a built-in one
(`chatml`) or a `.jinja` file instead. An example becomes token ids plus one flag per token:
trained or not. By default only the assistant's answer (up to and including its end-of-turn
token) is trained. When the template marks answers with `{% generation %}`, transformers computes
that mask; when it does not (transformers 5 then returns an all-zero mask with one log line), we
render the conversation prefix by prefix and mark the characters each answer adds. An example
whose answer is cut off entirely by `max_length` is dropped, never trained on an empty mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from loracli.errors import LoraError
from loracli.llm.data import Example

CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED = {"chatml": CHATML}
GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
SENTINEL = "\u2063lora-answer\u2063"  # text no template produces on its own


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]
    trained: tuple[bool, ...]      # per token: does predicting it count in the loss?
    source: str = ""

    @property
    def targets(self) -> list[int]:
        """Next-token targets, -100 where nothing is learned (the last token predicts nothing)."""
        return [self.ids[t + 1] if self.trained[t + 1] else -100
                for t in range(len(self.ids) - 1)] + [-100]


def resolve(tokenizer, template: str = "", base_dir: Path | None = None) -> str:
    """The Jinja chat template to use: the tokenizer's own, a named one, or a file's text."""
    if not template:
        if not getattr(tokenizer, "chat_template", None):
            raise LoraError("the model's tokenizer has no chat template, so chat and instruction "
                            "data cannot be rendered",
                            "set data.template = \"chatml\" (or a .jinja file), e.g. "
                            "`lora train --set data.template=chatml`")
        own = tokenizer.chat_template
        return own if isinstance(own, str) else own.get("default") or next(iter(own.values()))
    if template in NAMED:
        return NAMED[template]
    path = Path(template).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise LoraError(f"data.template {template!r}: not a named template "
                        f"({', '.join(NAMED)}) and no such file",
                        "set data.template to \"\" (the model's own), chatml, or a .jinja file")
    return path.read_text("utf-8")


def has_generation_markers(template: str) -> bool:
    return bool(GENERATION.search(template))


def render(tokenizer, template: str, messages, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template,
                                             tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's TemplateError, or raise_exception() inside the template
        raise LoraError(f"the chat template failed on a conversation: {e}",
                        "check the roles in your data (some templates allow no system message "
                        "or need user/assistant turns to alternate), or set data.template"
                        ) from None


def end_of_turn(tokenizer, template: str) -> tuple[str, int]:
    """The token the template puts after an answer (`<|im_end|>`, `<|eot_id|>`, `</s>`…)."""
    text = render(tokenizer, template, [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": SENTINEL}])
    after = text.split(SENTINEL, 1)[1].strip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    specials = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(t, "special", False)}
    if ids and ids[0] in specials:
        return tokenizer.convert_ids_to_tokens(ids[0]), ids[0]
    if tokenizer.eos_token_id is None:
        raise LoraError("the chat template ends an answer with no special token and the "
                        "tokenizer has no eos token: a fine-tuned model could not stop",
                        "set data.template to a template whose answers end in a special token")
    return tokenizer.eos_token, tokenizer.eos_token_id


def answer_spans(tokenizer, template: str, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its answers (prefix diffs)."""
    full = render(tokenizer, template, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, template, messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise LoraError("the chat template renders earlier turns differently once later ones "
                            "follow, so answers cannot be located without `{% generation %}` marks",
                            "give data.template a copy of the template with {% generation %}…"
                            "{% endgeneration %} around the assistant content")
        spans.append((len(before), len(upto.rstrip())))
    return full, spans


def _fallback_mask(tokenizer, template: str, messages) -> tuple[list[int], list[bool]]:
    full, spans = answer_spans(tokenizer, template, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), trained


def _marked_mask(tokenizer, template: str, messages) -> tuple[list[int], list[bool]]:
    out = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]


def _text(tokenizer, example: Example, max_length: int) -> list[Encoded]:
    """Raw text: the whole of it is learned, cut into windows of max_length, eos at the end."""
    ids = list(tokenizer(example.text)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return [Encoded(tuple(ids[i:i + max_length]), (True,) * len(ids[i:i + max_length]),
                    example.source) for i in range(0, len(ids), max_length)
            if len(ids[i:i + max_length]) > 1]


class Encoder:
    """Examples → `Encoded`, with one template, one length limit and one masking rule."""

    def __init__(self, tokenizer, template: str, max_length: int, train_on_prompt: bool = False):
        self.tokenizer, self.template = tokenizer, template
        self.max_length, self.train_on_prompt = max_length, train_on_prompt
        self.marked = has_generation_markers(template)
        self.fallbacks = 0     # conversations masked by prefix diffs
        self.truncated = 0     # conversations cut at max_length
        self.dropped: list[str] = []  # sources whose answers fell entirely past max_length

    def encode(self, example: Example) -> list[Encoded]:
        if example.kind == "text":
            return _text(self.tokenizer, example, self.max_length)
        ids, trained = ([], [])
        if self.marked:
            ids, trained = _marked_mask(self.tokenizer, self.template, example.messages)
        if not any(trained):  # no markers, or markers that marked nothing: never an empty mask
            ids, trained = _fallback_mask(self.tokenizer, self.template, example.messages)
            self.fallbacks += 1
        if self.train_on_prompt:
            trained = [True] * len(ids)
        if len(ids) > self.max_length:
            self.truncated += 1
            ids, trained = ids[: self.max_length], trained[: self.max_length]
        if not any(trained[1:]):
            self.dropped.append(example.source)
            return []
        return [Encoded(tuple(ids), tuple(trained), example.source)]

    def encode_all(self, examples) -> list[Encoded]:
        out = [e for ex in examples for e in self.encode(ex)]
        if not out:
            raise LoraError(f"no example keeps any answer token within data.max_length = "
                            f"{self.max_length}", "raise data.max_length (e.g. --set "
                            f"data.max_length={self.max_length * 2})")
        return out

    def warnings(self) -> list[str]:
        out = []
        if self.dropped:
            out.append(f"{len(self.dropped)} example(s) skipped: their answers start after "
                       f"data.max_length = {self.max_length} tokens (first: {self.dropped[0]})")
        if self.truncated:
            out.append(f"{self.truncated} example(s) cut at data.max_length = {self.max_length}")
        return out
