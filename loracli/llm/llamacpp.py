"""A peft LoRA of a Llama/Mistral/Qwen model as a llama.cpp GGUF adapter, written in-process.

What llama.cpp's own `convert_lora_to_gguf.py` writes (ggml-org/llama.cpp at commit 0b03adaa,
read for this module): `general.architecture` = the base model's GGUF architecture,
`general.type` = "adapter", `adapter.type` = "lora", `adapter.lora.alpha` (float32), and for each
adapted weight `blk.N.attn_q.weight.lora_a` (rank × in) and `….lora_b` (out × rank) under the
base model's GGUF tensor names. llama.cpp stores Llama's q/k projections with their rows permuted
for its RoPE layout (`LlamaModel.permute`); a LoRA's delta B·A must be permuted the same way,
which only reorders the rows of B. Qwen2/Qwen3 keep the Hugging Face order. llama.cpp applies
scale = alpha / rank, so an rsLoRA (alpha / √rank) is written with alpha × √rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from loracli.errors import LoraError

# Hugging Face model_type → (gguf.MODEL_ARCH member name, q/k rows permuted for RoPE)
ARCHS = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True),
         "qwen2": ("QWEN2", False), "qwen3": ("QWEN3", False)}
PEFT_PREFIX = "base_model.model."


def permute_rows(weight, n_head: int):
    """llama.cpp's `LlamaModel.permute` on the rows (dim 0) of `weight`."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _pairs(state: dict) -> dict[str, dict]:
    """{base weight name (`model.layers.0.self_attn.q_proj.weight`): {"A": tensor, "B": tensor}}."""
    out: dict[str, dict] = {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("A", "B"):
            marker = f".lora_{part}.weight"
            if name.endswith(marker):
                out.setdefault(name[: -len(marker)] + ".weight", {})[part] = tensor
                break
        else:
            raise LoraError(f"the adapter holds {key}, which a GGUF LoRA adapter cannot carry",
                            "export it with --format peft or --format merged")
    return out


def tensors(state: dict, adapter_config: dict, model_config: dict) -> tuple[str, float, dict]:
    """(GGUF architecture, alpha to write, {gguf tensor name: float32 numpy array})."""
    import gguf

    model_type = model_config.get("model_type", "")
    if model_type not in ARCHS:
        raise LoraError(f"no GGUF adapter layout for {model_type or 'this'} models here "
                        f"(supported: {', '.join(ARCHS)})",
                        "export with --format peft, or --format merged and convert that with "
                        "llama.cpp's convert_hf_to_gguf.py")
    if adapter_config.get("use_dora"):
        raise LoraError("llama.cpp has no DoRA adapters", "export with --format merged or peft")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise LoraError("per-module ranks or alphas do not fit a GGUF adapter's single alpha",
                        "export with --format peft or --format merged")
    arch_name, permuted = ARCHS[model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    n_head = model_config["num_attention_heads"]
    n_kv = model_config.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(arch, model_config["num_hidden_layers"])
    rank, alpha = adapter_config["r"], float(adapter_config["lora_alpha"])
    if adapter_config.get("use_rslora"):
        alpha *= math.sqrt(rank)
    out = {}
    for hf_name, pair in sorted(_pairs(state).items()):
        if set(pair) != {"A", "B"}:
            raise LoraError(f"the adapter has only half of the LoRA pair for {hf_name}",
                            "the checkpoint is damaged; export another with --step N")
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise LoraError(f"{hf_name} has no GGUF tensor name for {model_type}",
                            "export with --format peft or --format merged")
        a, b = pair["A"].float(), pair["B"].float()
        if permuted and hf_name.endswith("self_attn.q_proj.weight"):
            b = permute_rows(b, n_head)
        elif permuted and hf_name.endswith("self_attn.k_proj.weight"):
            b = permute_rows(b, n_kv)
        out[target + ".lora_a"] = a.contiguous().numpy()
        out[target + ".lora_b"] = b.contiguous().numpy()
    return gguf.MODEL_ARCH_NAMES[arch], alpha, out


def write(dest: Path, state: dict, adapter_config: dict, base_folder: Path,
          dtype: str = "fp16", name: str = "", force: bool = True) -> bool:
    """Write the adapter as one .gguf file at `dest` (atomically). Without `force` an existing
    different file is refused; an identical one is left alone (returns True: already there)."""
    import os
    import tempfile

    import gguf
    import numpy as np

    from loracli import atomic

    try:
        model_config = json.loads((Path(base_folder) / "config.json").read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise LoraError(f"{base_folder}: no readable config.json ({type(e).__name__})",
                        "the base model must be in the cache: `lora fetch MODEL`") from None
    arch, alpha, arrays = tensors(state, adapter_config, model_config)
    cast = {"fp16": np.float16, "fp32": np.float32}.get(dtype)
    if cast is None:
        raise LoraError(f"GGUF adapters are written as fp16 or fp32, not {dtype}",
                        "use --dtype fp16 (or fp32)")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if name:
            writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "fp16"
                             else gguf.LlamaFileType.ALL_F32)
        for tensor_name, array in arrays.items():
            writer.add_tensor(tensor_name, array.astype(cast))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if dest.exists() and not force:
            if dest.is_file() and dest.read_bytes() == Path(tmp).read_bytes():
                Path(tmp).unlink()
                return True
            raise LoraError(f"{dest} already exists (a different export)",
                            "pass --force to replace it, or -o to write somewhere else")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic.fsync_dir(dest.parent)
    return False
