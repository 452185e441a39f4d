"""The causal-LM half of a training step: base model, LoRA, loss, held-out loss and samples.

Every function takes the model and plain tensors, so the training loop (or a test) calls them
directly. The loss is returned as (sum over trained tokens, number of trained tokens): the loop
divides by the tokens of the whole optimizer step, so gradient accumulation averages over answer
tokens rather than over micro-batches (the bug class of transformers PR #34191).
"""

from __future__ import annotations

import math
from pathlib import Path

from loracli.errors import LoraError

DEFAULT_TARGETS = ("q_proj", "v_proj")
QUANTIZE = ("", "4bit")


def quantization_config(quantize: str, compute_dtype):
    """bitsandbytes nf4 with double quantization (QLoRA), or None."""
    if not quantize:
        return None
    if quantize not in QUANTIZE:
        raise LoraError(f"unknown model.quantize {quantize!r}",
                        "set model.quantize to \"\" or \"4bit\"")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoraError("model.quantize = \"4bit\" needs bitsandbytes",
                        "pip install 'bitsandbytes>=0.45' (0.50+ also runs on the CPU), or "
                        "--set model.quantize=\"\"") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)


def is_prequantized(folder: Path) -> bool:
    """Whether a model folder holds already-quantized weights (a 4-bit/8-bit checkpoint)."""
    import json

    try:
        config = json.loads((Path(folder) / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return bool(config.get("quantization_config"))


def load_base(folder: Path, quantize: str = "", device: str = "cpu", dtype=None):
    """The base causal LM from a local folder (never the network), frozen."""
    import torch
    import transformers.utils.logging
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    dtype = dtype or torch.float32
    kwargs = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}  # no pickles
    q = quantization_config(quantize, dtype)
    if q is not None:
        kwargs["quantization_config"] = q
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as e:
        raise LoraError(f"{folder}: cannot load it as a causal language model ({e})",
                        "check model.base; `lora fetch ORG/NAME` puts a model in the cache"
                        ) from None
    if q is None:
        model.to(device)
    elif str(device) == "cpu":
        _keep_4bit_trainable(model)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def _keep_4bit_trainable(model) -> None:
    """bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a 4-bit weight for fast inference the
    first time it runs in eval mode without grad (held-out loss, samples); the repacked weight
    has no autograd kernel, so every later training step gets no gradient. Keep the trainable
    layout (inference on the CPU is a small part of a run)."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token_id is None:  # padding is masked by position, so eos can stand in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(rank: int = 8, alpha: float = 16, dropout: float = 0.1,
                targets=DEFAULT_TARGETS, rslora: bool = False, dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(targets), use_rslora=rslora, use_dora=dora,
                      bias="none", task_type="CAUSAL_LM")


def inject(model, config, seed: int, gradient_checkpointing: bool = False):
    """The model with a fresh LoRA (initialised from `seed`); only the LoRA trains."""
    import torch
    from peft import get_peft_model

    if gradient_checkpointing:
        # non-reentrant: with the reentrant variant and frozen inputs no gradient reaches the
        # LoRA (peft #1142); the embeddings need no requires_grad hook this way
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    missing = [t for t in config.target_modules
               if not any(n.endswith("." + t) or n == t for n, _ in model.named_modules())]
    if missing:
        raise LoraError(f"lora.targets {sorted(missing)} match no module of this model",
                        "use module names of the model, e.g. q_proj, k_proj, v_proj, o_proj, "
                        "gate_proj, up_proj, down_proj")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    return peft_model


def loss(model, batch: dict):
    """(sum of token cross-entropies over trained targets, number of trained targets)."""
    import torch
    import torch.nn.functional as F

    device = next(p.device for p in model.parameters())
    mask = batch["attention_mask"]
    out = model(input_ids=batch["input_ids"].to(device),
                attention_mask=None if mask is None else mask.to(device),
                position_ids=batch["position_ids"].to(device), use_cache=False)
    targets = batch["targets"].to(device)
    logits = out.logits.float()
    total = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1),
                            ignore_index=-100, reduction="sum")
    return total, int((targets != -100).sum())


def evaluate(model, batches: list[dict], base_too: bool = False) -> dict:
    """Held-out loss (mean over answer tokens) and perplexity, with the LoRA and, optionally,
    without it (the base model's numbers, for comparison)."""
    import contextlib

    import torch

    def score(ctx) -> tuple[float, int]:
        total, count = 0.0, 0
        with ctx, torch.no_grad():
            for b in batches:
                s, n = loss(model, b)
                total, count = total + float(s), count + n
        return total, count

    was_training = model.training
    model.eval()
    try:
        total, count = score(contextlib.nullcontext())
        out = {"eval_tokens": count}
        if count:
            out.update(eval_loss=total / count, perplexity=math.exp(min(total / count, 50)))
        if base_too and count and hasattr(model, "disable_adapter"):
            base_total, _ = score(model.disable_adapter())
            out.update(base_eval_loss=base_total / count,
                       base_perplexity=math.exp(min(base_total / count, 50)))
    finally:
        model.train(was_training)
    return out


def generate(model, tokenizer, template: str, prompts, stop_ids, max_new_tokens: int = 48):
    """Greedy answers to `prompts` (each a user message), cut at the template's end of turn."""
    import torch

    from loracli.llm.templates import render

    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    answers = []
    try:
        for prompt in prompts:
            text = render(tokenizer, template, [{"role": "user", "content": prompt}],
                          add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device),
                                     attention_mask=torch.ones_like(ids).to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=list(stop_ids),
                                     pad_token_id=tokenizer.pad_token_id, use_cache=True)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


def adapter_state(model) -> dict:
    """The LoRA weights in peft's saved layout (`base_model.model.…lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_state(model, state: dict) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise LoraError(f"the checkpoint's adapter does not fit this model ({unexpected[0]} …)",
                        "resume with the base model and lora settings the run started with")
