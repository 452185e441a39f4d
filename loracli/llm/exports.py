"""An LLM LoRA as the folders transformers, vLLM and Ollama load.

`write_peft`: adapter_model.safetensors + adapter_config.json + the tokenizer with the chat
template the model was trained with (`chat_template.jinja`). `write_merged`: the base model
with the LoRA folded in, saved as a full transformers folder with the same tokenizer and template
and a `generation_config.json` whose end tokens include the template's end of turn, so the model
stops after its answer. Merging happens only into full-precision weights: a LoRA trained with
`quantize = "4bit"` (QLoRA) is merged into the full-precision base it was quantized from; a
folder of already-quantized weights is refused. Folders are written beside the destination and
renamed into place, so a crash never leaves half an export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from loracli import atomic
from loracli.errors import LoraError
from loracli.llm import causal, templates

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def peft_config(adapter_config: dict):
    """A `LoraConfig` from a saved adapter_config.json mapping."""
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in adapter_config.items() if k in known})


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise LoraError(f"unknown dtype {dtype!r}", "use --dtype fp16, bf16 or fp32")
    return getattr(torch, DTYPES[dtype])


def same_folder(a: Path, b: Path) -> bool:
    """Whether two folders hold the same files with the same bytes."""
    files_a = sorted(p.relative_to(a) for p in Path(a).rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in Path(b).rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes()
                                      for f in files_a)


class _Staging:
    """A sibling temp folder renamed onto `dest` on success, removed on failure. When `dest`
    exists without `force`: identical → left alone (`already` set), different → refused."""

    def __init__(self, dest: Path, force: bool):
        self.dest, self.force, self.already = Path(dest), force, False
        self.tmp = self.dest.with_name(f".{self.dest.name}.partial-{os.getpid()}")

    def __enter__(self) -> "_Staging":
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.dest.exists() and not self.force:
            identical = self.dest.is_dir() and same_folder(self.tmp, self.dest)
            shutil.rmtree(self.tmp, ignore_errors=True)
            if not identical:
                raise LoraError(f"{self.dest} already exists (a different export)",
                                "pass --force to replace it, or -o to write somewhere else")
            self.already = True
            return False
        for f in self.tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
        if self.dest.exists():
            os.replace(self.dest, old)
        os.replace(self.tmp, self.dest)
        shutil.rmtree(old, ignore_errors=True)
        atomic.fsync_dir(self.dest.parent)
        return False


def _save_tokenizer(folder: Path, tokenizer, template: str) -> None:
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
    if not (folder / "chat_template.jinja").is_file():  # older transformers keep it in the json
        (folder / "chat_template.jinja").write_text(template, "utf-8")


def write_peft(dest: Path, state: dict, adapter_config: dict, tokenizer, template: str,
               base_model: str = "", dtype: str = "fp32", force: bool = False) -> bool:
    """A peft adapter folder (what `PeftModel.from_pretrained` and vLLM's LoRA loader read).
    Returns True when an identical export was already there."""
    from safetensors.torch import save_file

    torch_dtype = _torch_dtype(dtype)
    config = {**adapter_config, "base_model_name_or_path": base_model or
              adapter_config.get("base_model_name_or_path")}
    with _Staging(dest, force) as staging:
        tmp = staging.tmp
        save_file({k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in state.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True),
                                                 "utf-8")
        _save_tokenizer(tmp, tokenizer, template)
    return staging.already


def merged_model(base_folder: Path, state: dict, adapter_config: dict, weight: float = 1.0):
    """The base model (full precision) with the LoRA folded into its weights."""
    from peft import get_peft_model

    if causal.is_prequantized(base_folder):
        raise LoraError(f"{base_folder} holds quantized weights; folding a LoRA into 4-bit "
                        "weights would round most of it away",
                        "point model.base at the full-precision model the LoRA was trained on, "
                        "or export with --format peft / --format gguf and apply it at load time")
    base = causal.load_base(base_folder)
    model = get_peft_model(base, peft_config({**adapter_config, "inference_mode": True}))
    causal.load_adapter_state(model, state)
    if weight != 1.0:
        for module in model.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling = {k: v * weight for k, v in module.scaling.items()}
    return model.merge_and_unload()


def generation_ids(tokenizer, template: str) -> list[int]:
    """The ids generation must stop at: the template's end of turn first, then eos."""
    _, eot = templates.end_of_turn(tokenizer, template)
    ids = [eot]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id != eot:
        ids.append(tokenizer.eos_token_id)
    return ids


def write_merged(dest: Path, base_folder: Path, state: dict, adapter_config: dict, tokenizer,
                 template: str, dtype: str = "fp16", weight: float = 1.0,
                 force: bool = False, public_name: str = "", local_roots=()) -> bool:
    """A full transformers model folder: merged weights, tokenizer, template, end tokens.
    Any config value naming a path under `local_roots` is rewritten (`public_name` for the
    `_name_or_path` keys). Returns True when an identical export was already there."""
    from transformers import GenerationConfig

    torch_dtype = _torch_dtype(dtype)
    model = merged_model(base_folder, state, adapter_config, weight).to(torch_dtype)
    stop = generation_ids(tokenizer, template)
    try:
        generation = GenerationConfig.from_pretrained(str(base_folder), local_files_only=True)
    except OSError:
        generation = GenerationConfig()
    generation.eos_token_id = stop if len(stop) > 1 else stop[0]
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation
    model.config.use_cache = True
    with _Staging(dest, force) as staging:
        model.save_pretrained(str(staging.tmp), safe_serialization=True)
        _save_tokenizer(staging.tmp, tokenizer, template)
        if local_roots:
            from loracli.exporting import provenance

            provenance.scrub_config_folder(staging.tmp, public_name, list(local_roots))
    return staging.already
