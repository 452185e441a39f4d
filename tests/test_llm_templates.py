"""Chat templates and loss masks: transformers' own assistant mask is the oracle for ours."""

from __future__ import annotations

import pytest
from llm_fixtures import CHAT, chatml_tokenizer  # noqa: F401 (fixture)

from loracli.errors import LoraError
from loracli.llm import batches, data, templates
from loracli.llm.data import Example

UNMARKED = templates.CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def examples():
    return [data.parse(r, f"t:{i}")[0] for i, r in enumerate(CHAT)]


def test_fallback_mask_equals_transformers_generation_mask(chatml_tokenizer):
    tok = chatml_tokenizer
    for ex in examples():
        out = tok.apply_chat_template(list(ex.messages), chat_template=templates.CHATML,
                                      tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ours = templates._fallback_mask(tok, UNMARKED, ex.messages)
        assert ours[0] == list(out["input_ids"])
        assert ours[1] == [bool(x) for x in out["assistant_masks"]]
        assert any(ours[1])


def test_template_without_generation_marks_is_detected_and_masked_correctly(chatml_tokenizer):
    tok = chatml_tokenizer
    ex = examples()[0]
    # what transformers 5 does on its own: an all-zero mask
    raw = tok.apply_chat_template(list(ex.messages), chat_template=UNMARKED, tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    assert not any(raw["assistant_masks"])
    enc = templates.Encoder(tok, UNMARKED, 512)
    assert not enc.marked
    (e,) = enc.encode(ex)
    assert enc.fallbacks == 1
    learned = tok.decode([i for i, t in zip(e.ids, e.trained) if t])
    assert learned == "Four.<|im_end|>Six.<|im_end|>"
    marked = templates.Encoder(tok, templates.CHATML, 512).encode(ex)[0]
    assert marked == e


def test_targets_are_next_tokens_of_answers_only(chatml_tokenizer):
    tok = chatml_tokenizer
    (e,) = templates.Encoder(tok, templates.CHATML, 512).encode(examples()[2])
    targets = e.targets
    assert len(targets) == len(e.ids) and targets[-1] == -100
    learned = [t for t in targets if t != -100]
    assert tok.decode(learned) == "bonjour<|im_end|>"
    assert learned[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_train_on_prompt_trains_every_token(chatml_tokenizer):
    enc = templates.Encoder(chatml_tokenizer, templates.CHATML, 512, train_on_prompt=True)
    (e,) = enc.encode(examples()[0])
    assert all(e.trained) and sum(t != -100 for t in e.targets) == len(e.ids) - 1


def test_pad_equal_to_eos_still_teaches_stopping(chatml_tokenizer):
    tok = chatml_tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    enc = templates.Encoder(tok, templates.CHATML, 512)
    short, long = enc.encode(examples()[2])[0], enc.encode(examples()[0])[0]
    b = batches.collate([[short], [long]], pad_id=eos, packed=False)
    row = b["targets"][0].tolist()
    n = len(short.ids)
    assert row[:n] == short.targets and eos in row[:n]       # the answer's end is learned
    assert row[n:] == [-100] * (len(long.ids) - n)           # padding (also eos ids) is not
    assert b["input_ids"][0, n:].eq(eos).all()
    assert b["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.ids) - n)


def test_answers_past_max_length_are_dropped_never_trained_empty(chatml_tokenizer):
    enc = templates.Encoder(chatml_tokenizer, templates.CHATML, 12)
    kept = enc.encode_all(examples()[1:3] + [Example("t:raw", "text", text="a b c d e f g")])
    assert enc.dropped == ["t:1", "t:2"] and enc.truncated == 2
    assert "2 example(s) skipped" in enc.warnings()[0]
    assert all(any(e.trained[1:]) for e in kept)
    with pytest.raises(LoraError, match="no example keeps any answer token") as e:
        templates.Encoder(chatml_tokenizer, templates.CHATML, 8).encode_all(examples()[:2])
    assert "data.max_length=16" in e.value.hint


def test_raw_text_is_cut_into_windows_ending_in_eos(chatml_tokenizer):
    tok = chatml_tokenizer
    text = "The quick brown fox jumps over the lazy dog. " * 4
    parts = templates.Encoder(tok, templates.CHATML, 16).encode(Example("t", "text", text=text))
    ids = [i for p in parts for i in p.ids]
    assert all(len(p.ids) <= 16 for p in parts) and len(parts) > 1
    assert ids == tok(text)["input_ids"] + [tok.eos_token_id]


def test_template_sources_and_end_of_turn(chatml_tokenizer, tmp_path):
    tok = chatml_tokenizer
    assert templates.resolve(tok) == tok.chat_template
    assert templates.resolve(tok, "chatml") == templates.CHATML
    (tmp_path / "t.jinja").write_text(UNMARKED)
    assert templates.resolve(tok, "t.jinja", base_dir=tmp_path) == UNMARKED
    assert templates.end_of_turn(tok, UNMARKED) == ("<|im_end|>", tok.eos_token_id)
    with pytest.raises(LoraError, match="no such file"):
        templates.resolve(tok, "missing.jinja", base_dir=tmp_path)
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(LoraError, match="no chat template") as e:
        templates.resolve(bare)
    assert "data.template=chatml" in e.value.hint


def test_a_template_that_rewrites_history_needs_generation_marks(chatml_tokenizer):
    # drops the content of earlier assistant turns (as thinking templates do)
    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                 "<|im_start|>assistant\n<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n"
                 "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    enc = templates.Encoder(chatml_tokenizer, rewriting, 512)
    with pytest.raises(LoraError, match="renders earlier turns differently") as e:
        enc.encode(examples()[0])
    assert "{% generation %}" in e.value.hint
