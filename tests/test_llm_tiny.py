"""The tiny LLMs: deterministic, loadable by plain transformers, installable into the cache."""

from __future__ import annotations

import hashlib

import pytest
from hub_fixtures import online  # noqa: F401 (fixture)
from llm_fixtures import tiny_llama, tiny_qwen2  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".built"}


def test_the_build_is_deterministic(tiny_llama, tmp_path):
    from loracli.llm import tinyllm

    assert digests(tinyllm.build(tmp_path / "again", "llama")) == digests(tiny_llama)


@pytest.mark.parametrize("arch,cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_tiny_models_load_with_plain_transformers(arch, cls, request):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = request.getfixturevalue(f"tiny_{arch}")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == cls
    assert len(tok) == model.config.vocab_size == 512
    assert "{% generation %}" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert GenerationConfig.from_pretrained(folder).eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == text  # byte-level BPE round-trips
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 512)


def test_tiny_llama_installs_into_the_model_cache():
    from loracli.hub import models
    from loracli.llm import runfolder
    from loracli.llm.task import resolve_base

    snap = models.install_tiny("tiny-llama")
    assert (snap / "config.json").is_file() and runfolder.is_causal_lm(snap)
    assert models.install_tiny("tiny-llama") == snap  # idempotent: same commit
    assert resolve_base("tiny-llama") == models.local_snapshot("tiny-llama") == snap
    assert models.resolve("tiny-qwen2").local


def test_llm_aliases_fetch_safetensors_tokenizer_and_template_only():
    from loracli.hub import models

    ref = models.resolve("qwen2.5-0.5b-instruct")
    assert ref.repo_id == "Qwen/Qwen2.5-0.5B-Instruct"
    wanted = ["config.json", "generation_config.json", "model.safetensors",
              "model-00001-of-00004.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "merges.txt", "vocab.json",
              "chat_template.jinja", "tokenizer.model"]
    unwanted = ["pytorch_model.bin", "consolidated.pth", "onnx/model.onnx", "original/params.pt",
                "README.md"]
    assert all(models.matches(f, ref.include) for f in wanted)
    assert not any(models.matches(f, ref.include) for f in unwanted)


def test_fetch_an_llm_alias_through_a_mirror_takes_only_what_training_loads(
        cli, online, tiny_qwen2, tmp_path):  # noqa: F811 (online: hub_fixtures)
    import json
    import shutil

    from hubserver import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracli.hub import models
    from loracli.llm import runfolder

    upstream = tmp_path / "upstream"
    shutil.copytree(tiny_qwen2, upstream)
    (upstream / ".built").unlink(missing_ok=True)
    (upstream / "pytorch_model.bin").write_bytes(b"a pickle lora never downloads")
    (upstream / "README.md").write_text("# model card")
    with serve({"Qwen/Qwen2.5-0.5B-Instruct": upstream}) as url:
        r = cli("fetch", "qwen2.5-0.5b-instruct", "--mirror", url, "--json")
        assert r.exit_code == 0, r.stderr
    snap = models.local_snapshot("qwen2.5-0.5b-instruct")
    got = sorted(p.name for p in snap.iterdir())
    assert "pytorch_model.bin" not in got and "README.md" not in got
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "generation_config.json"} <= set(got)
    assert sorted(f["path"] for f in json.loads(r.stdout)["files"]) == got
    assert runfolder.is_causal_lm(snap)
    model = AutoModelForCausalLM.from_pretrained(snap, local_files_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert "{% generation %}" in AutoTokenizer.from_pretrained(snap).chat_template
