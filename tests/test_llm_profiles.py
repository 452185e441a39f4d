"""The language-model profile keys and presets: parsed strictly, carried into the LLM task."""

from __future__ import annotations

import tomllib

import pytest

from loracli import profiles
from loracli.errors import LoraError
from loracli.llm.task import Settings


@pytest.mark.parametrize("name", ["chat", "chat-qlora"])
def test_llm_presets_list_and_comment_every_key(name):
    text = profiles.preset_text(name)
    data = tomllib.loads(text)
    assert {f"{s}.{k}" for s, t in data.items() for k in t} == set(profiles.all_keys())
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line.split("=", 1)[1], f"{name}: no comment on {line!r}"
    assert name in profiles.names()


def test_chat_preset_has_the_brief_defaults():
    s = Settings.from_profile(profiles.load("chat"))
    assert (s.rank, s.alpha, s.dropout, s.targets, s.learning_rate) == \
        (8, 16.0, 0.1, ("q_proj", "v_proj"), 2e-4)
    assert s.base == "qwen2.5-0.5b-instruct" and s.eval_split == 0.05 and s.quantize == ""
    assert s.gradient_checkpointing and s.accumulation == 4 and not s.train_on_prompt
    q = Settings.from_profile(profiles.load("chat-qlora"))
    assert q.quantize == "4bit" and q.base == "llama-3.1-8b-instruct"


def test_llm_keys_are_set_and_checked_like_every_key():
    p = profiles.load("chat", ["data.max_length=512", "data.packing=true", "model.quantize=4bit",
                               "data.template=chatml", "data.train_on_prompt=true",
                               "sample.max_new_tokens=16", "data.format=instruction"])
    s = Settings.from_profile(p)
    assert (s.max_length, s.packing, s.quantize, s.template, s.train_on_prompt,
            s.max_new_tokens, s.format) == (512, True, "4bit", "chatml", True, 16, "instruction")
    with pytest.raises(LoraError) as e:
        profiles.load("chat", ["model.quantize=8bit", "data.max_length=4", "data.eval_split=0.9",
                               "data.fromat=chat"])
    text = " ".join(e.value.details)
    assert "model.quantize" in text and "data.max_length" in text and "data.eval_split" in text
    assert "data.format" in text  # the did-you-mean for the misspelt key


def test_an_image_profile_keeps_image_targets_but_an_llm_gets_q_and_v():
    assert Settings.from_profile(profiles.load("default")).targets == ("q_proj", "v_proj")
    custom = profiles.load("default", ['lora.targets=["q_proj", "o_proj"]'])
    assert Settings.from_profile(custom).targets == ("q_proj", "o_proj")
