"""LLM exports read back with plain transformers, peft and gguf's own reader."""

from __future__ import annotations

import json
import shutil

import pytest
from llm_fixtures import tiny_llama, tiny_qwen2  # noqa: F401 (fixtures)

from loracli.errors import LoraError
from loracli.llm import causal, exports, llamacpp

pytestmark = pytest.mark.slow

IDS = [[1, 85, 91, 431, 391, 201, 36, 71, 350, 406, 16, 2, 201, 1, 318, 299, 300, 201]]


def trained_adapter(folder, targets=("q_proj", "k_proj", "v_proj"), rank=4, alpha=8.0, **kw):
    """A LoRA whose B is non-zero (as after training), its state and its config mapping."""
    import torch

    config = causal.lora_config(rank=rank, alpha=alpha, dropout=0.0, targets=targets, **kw)
    model = causal.inject(causal.load_base(folder), config, seed=3)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    mapping = {k: (sorted(v) if isinstance(v, (set, frozenset)) else getattr(v, "value", v))
               for k, v in model.peft_config["default"].to_dict().items()}
    return model, causal.adapter_state(model), json.loads(json.dumps(mapping))


def reference_delta(folder, state, scale):
    """{HF weight name: scale · B @ A}, computed from the raw tensors (no peft)."""
    out = {}
    for k, a in state.items():
        if ".lora_A." in k:
            b = state[k.replace(".lora_A.", ".lora_B.")]
            out[k.removeprefix("base_model.model.").replace(".lora_A", "")] = scale * (b @ a)
    return out


def test_peft_export_loads_with_peft_and_keeps_the_template(tiny_llama, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, state, config = trained_adapter(tiny_llama)
    tok = causal.load_tokenizer(tiny_llama)
    dest = tmp_path / "out"
    assert not exports.write_peft(dest, state, config, tok, tok.chat_template,
                                  base_model="loracli/tiny-llama")
    assert json.loads((dest / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "loracli/tiny-llama"
    assert (dest / "chat_template.jinja").read_text() == tok.chat_template
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), dest)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(dest).chat_template == tok.chat_template
    with pytest.raises(LoraError, match="already exists") as e:  # a different export
        exports.write_peft(dest, state, config, tok, tok.chat_template, base_model="other")
    assert "--force" in e.value.hint
    assert not list(tmp_path.glob(".out.partial*"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_logits_equal_base_plus_adapter(arch, request, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = request.getfixturevalue(f"tiny_{arch}")
    _, state, config = trained_adapter(folder)
    tok = causal.load_tokenizer(folder)
    dest = tmp_path / "merged"
    exports.write_merged(dest, folder, state, config, tok, tok.chat_template, dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(dest)
    oracle = AutoModelForCausalLM.from_pretrained(folder)
    weights = dict(oracle.named_parameters())
    with torch.no_grad():
        for name, delta in reference_delta(folder, state, 8.0 / 4).items():
            weights[name] += delta
        ids = torch.tensor(IDS)
        torch.testing.assert_close(merged(ids).logits, oracle(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids).logits,
                                  AutoModelForCausalLM.from_pretrained(folder)(ids).logits)
    assert GenerationConfig.from_pretrained(dest).eos_token_id == tok.convert_tokens_to_ids(
        "<|im_end|>")
    assert (dest / "chat_template.jinja").read_text() == tok.chat_template


def test_merged_generation_config_stops_at_the_templates_end_of_turn(tiny_llama, tmp_path):
    from transformers import GenerationConfig

    _, state, config = trained_adapter(tiny_llama)
    tok = causal.load_tokenizer(tiny_llama)
    tok.eos_token = "<|endoftext|>"  # a base model whose eos is not the chat end of turn
    dest = tmp_path / "m"
    exports.write_merged(dest, tiny_llama, state, config, tok, tok.chat_template, dtype="fp16")
    gen = GenerationConfig.from_pretrained(dest)
    assert gen.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"),
                                tok.convert_tokens_to_ids("<|endoftext|>")]


def test_merging_into_quantized_weights_is_refused(tiny_llama, tmp_path):
    _, state, config = trained_adapter(tiny_llama)
    quantized = tmp_path / "q"
    shutil.copytree(tiny_llama, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(cfg))
    tok = causal.load_tokenizer(tiny_llama)
    with pytest.raises(LoraError, match="quantized weights") as e:
        exports.write_merged(tmp_path / "m", quantized, state, config, tok, tok.chat_template)
    assert "full-precision" in e.value.hint and not (tmp_path / "m").exists()


def hf_to_llamacpp_rows(rows: int, n_head: int) -> list[int]:
    """Reference: llama.cpp wants each head's (first half, second half) rows interleaved."""
    d = rows // n_head
    return [h * d + i + half * (d // 2) for h in range(n_head) for i in range(d // 2)
            for half in (0, 1)]


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, field in reader.fields.items():
        value = field.contents()
        fields[name] = value
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def test_gguf_llama_adapter_names_shapes_and_rope_permutation(tiny_llama, tmp_path):
    import numpy as np

    _, state, config = trained_adapter(tiny_llama)
    path = tmp_path / "a.gguf"
    assert not llamacpp.write(path, state, config, tiny_llama, dtype="fp32", name="tiny")
    fields, tensors = read_gguf(path)
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)
    expected = {f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in (0, 1) for p in "qkv" for ab in "ab"}
    assert set(tensors) == expected
    cfg = json.loads((tiny_llama / "config.json").read_text())
    for i in (0, 1):
        for proj, heads, out in (("q", cfg["num_attention_heads"], 64),
                                 ("k", cfg["num_key_value_heads"], 32), ("v", None, 32)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}_proj"
            a = state[f"{prefix}.lora_A.weight"].numpy()
            b = state[f"{prefix}.lora_B.weight"].numpy()
            ta, tb = tensors[f"blk.{i}.attn_{proj}.weight.lora_a"], \
                tensors[f"blk.{i}.attn_{proj}.weight.lora_b"]
            # ggml order: ne0 is the row length (in features for A, the rank for B)
            assert list(ta.shape) == [64, 4] and list(tb.shape) == [4, out]
            ga = np.asarray(ta.data).reshape(4, 64)
            gb = np.asarray(tb.data).reshape(out, 4)
            np.testing.assert_array_equal(ga, a)
            want = b if heads is None else b[hf_to_llamacpp_rows(out, heads)]
            np.testing.assert_array_equal(gb, want)
            if heads is not None:
                assert not np.array_equal(gb, b)


def test_gguf_qwen2_keeps_row_order_and_fp16(tiny_qwen2, tmp_path):
    import numpy as np

    _, state, config = trained_adapter(tiny_qwen2, targets=("q_proj", "v_proj"), rank=8,
                                       alpha=16.0, rslora=True)
    path = tmp_path / "q.gguf"
    llamacpp.write(path, state, config, tiny_qwen2, dtype="fp16")
    fields, tensors = read_gguf(path)
    assert fields["general.architecture"] == "qwen2"
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0 * 8 ** 0.5)  # rsLoRA scale kept
    b = state["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].numpy()
    gb = tensors["blk.1.attn_q.weight.lora_b"]
    assert np.asarray(gb.data).dtype == np.float16
    np.testing.assert_allclose(np.asarray(gb.data).reshape(b.shape), b, rtol=1e-3, atol=1e-4)


def test_gguf_refuses_what_llamacpp_cannot_load(tiny_llama, tmp_path):
    _, state, config = trained_adapter(tiny_llama)
    with pytest.raises(LoraError, match="no DoRA"):
        llamacpp.tensors(state, {**config, "use_dora": True}, {"model_type": "llama"})
    with pytest.raises(LoraError, match="no GGUF adapter layout for gpt2") as e:
        llamacpp.tensors(state, config, {"model_type": "gpt2"})
    assert "--format peft" in e.value.hint
    with pytest.raises(LoraError, match="fp16 or fp32"):
        llamacpp.write(tmp_path / "x.gguf", state, config, tiny_llama, dtype="bf16")
    assert not list(tmp_path.iterdir())


def test_inspect_reads_a_gguf_adapter_and_refuses_a_model(tiny_llama, tmp_path):
    import gguf
    import numpy as np

    from loracli.llm.inspection import inspect_gguf

    _, state, config = trained_adapter(tiny_llama)
    path = tmp_path / "a.gguf"
    llamacpp.write(path, state, config, tiny_llama, dtype="fp16", name="pirate")
    report = inspect_gguf(path)
    assert report["format"] == "gguf" and report["base_model_version"] == "llama"
    assert report["name"] == "pirate" and report["ranks"] == [4] and report["alphas"] == [8.0]
    assert report["modules"] == {"model": 6} and report["kinds"] == {"lora_a": 6, "lora_b": 6}
    assert report["dtypes"] == {"F16": 12}
    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(model), arch="llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LoraError, match="not a LoRA adapter"):
        inspect_gguf(model)
