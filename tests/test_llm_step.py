"""The causal-LM step on tiny Llama/Qwen2: packing isolation, token-averaged accumulation,
gradient checkpointing and QLoRA, each checked against plain transformers/peft."""

from __future__ import annotations

import pytest
from llm_fixtures import CHAT, tiny_llama, tiny_qwen2  # noqa: F401 (fixtures)

from loracli.llm import batches, causal, data, templates

pytestmark = pytest.mark.slow


def encoded(folder, train_on_prompt=False):
    tok = causal.load_tokenizer(folder)
    examples = [data.parse(r, f"t:{i}")[0] for i, r in enumerate(CHAT)]
    encoder = templates.Encoder(tok, templates.resolve(tok), 256, train_on_prompt)
    return tok, encoder.encode_all(examples)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_rows_give_the_unpacked_logits(arch, request):
    import torch

    folder = request.getfixturevalue(f"tiny_{arch}")
    tok, enc = encoded(folder)
    model = causal.load_base(folder)
    packed = batches.collate([enc], tok.pad_token_id, packed=True)
    assert packed["attention_mask"] is None
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       use_cache=False).logits[0]
        at = 0
        for e in enc:
            alone = model(input_ids=torch.tensor([e.ids])).logits[0]
            torch.testing.assert_close(logits[at:at + len(e.ids)], alone, atol=1e-5, rtol=1e-4)
            at += len(e.ids)
        # and the same tokens laid end to end *with* one shared position run would differ
        crossed = model(input_ids=packed["input_ids"]).logits[0]
        n0 = len(enc[0].ids)
        assert not torch.allclose(crossed[n0:n0 + 3], logits[n0:n0 + 3], atol=1e-3)
    model_loss = causal.loss(model, packed)
    padded = causal.loss(model, batches.collate([[e] for e in enc], tok.pad_token_id, False))
    assert model_loss[1] == padded[1] == sum(sum(t != -100 for t in e.targets) for e in enc)
    assert float(model_loss[0]) == pytest.approx(float(padded[0]), rel=1e-4)


def test_loss_matches_transformers_labels_loss(tiny_llama):
    import torch

    tok, enc = encoded(tiny_llama)
    model = causal.load_base(tiny_llama)
    b = batches.collate([[e] for e in enc], tok.pad_token_id, packed=False)
    labels = torch.tensor([[i if t else -100 for i, t in zip(e.ids, e.trained)]
                           + [-100] * (b["input_ids"].shape[1] - len(e.ids)) for e in enc])
    with torch.no_grad():
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    labels=labels).loss
        total, count = causal.loss(model, b)
    assert float(total / count) == pytest.approx(float(ref), rel=1e-5)


def test_accumulation_averages_over_answer_tokens_not_micro_batches(tiny_llama):
    """Two micro-batches with very different answer lengths: the gradient equals the one of a
    single batch holding both (transformers' mean over all labels as the oracle)."""
    import torch

    tok, enc = encoded(tiny_llama, train_on_prompt=True)
    small, big = [enc[2]], [enc[0], enc[1]]
    grads = []
    for split in (True, False):
        model = causal.inject(causal.load_base(tiny_llama),
                              causal.lora_config(dropout=0.0), seed=0)
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        if split:
            parts = [batches.collate([[e] for e in group], tok.pad_token_id, False)
                     for group in (small, big)]
            total = sum(sum(t != -100 for e in g for t in e.targets) for g in (small, big))
            for part in parts:
                s, _ = causal.loss(model, part)
                (s / total).backward()
        else:
            b = batches.collate([[e] for e in small + big], tok.pad_token_id, False)
            labels = b["targets"].clone()
            labels = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], 1)
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                  labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_still_trains_the_lora(tiny_qwen2):
    import torch

    tok, enc = encoded(tiny_qwen2)
    b = batches.collate([[e] for e in enc], tok.pad_token_id, False)
    grads = []
    for checkpointing in (False, True):
        model = causal.inject(causal.load_base(tiny_qwen2), causal.lora_config(dropout=0.0),
                              seed=5, gradient_checkpointing=checkpointing)
        model.train()
        s, n = causal.loss(model, b)
        (s / n).backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    for k in grads[0]:
        assert grads[1][k] is not None, f"{k} got no gradient with checkpointing"
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-4)
    assert any(float(g.abs().sum()) > 0 for k, g in grads[1].items() if "lora_B" in k)


def test_qlora_4bit_loads_nf4_double_quant_and_trains(tiny_llama):
    pytest.importorskip("bitsandbytes")
    import torch
    from bitsandbytes.nn import Linear4bit

    tok, enc = encoded(tiny_llama)
    model = causal.load_base(tiny_llama, quantize="4bit")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit)
    assert q.weight.quant_state.quant_type == "nf4" and q.weight.quant_state.nested
    peft_model = causal.inject(model, causal.lora_config(dropout=0.0), seed=0,
                               gradient_checkpointing=True)
    b = batches.collate([[e] for e in enc], tok.pad_token_id, False)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(5):
        s, n = causal.loss(peft_model, b)
        (s / n).backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else float(s.detach() / n)
    assert float(s.detach() / n) < first
