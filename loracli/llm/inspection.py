"""`lora inspect` for a llama.cpp GGUF LoRA adapter: what `lora inspect --json` reports.

The report has the fields of the image LoRA reports (`loracli.exporting.inspection.inspect_lora`), so the
command renders both alike; `base_model_version` is the GGUF architecture the adapter is for.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from loracli.errors import LoraError

QUANT_NAMES = {0: "F32", 1: "F16", 30: "BF16", 8: "Q8_0"}


def _value(field):
    try:
        return field.contents()
    except Exception:  # an array of strings or an odd type: leave it out rather than fail
        return None


def inspect_gguf(path: str | Path) -> dict:
    """Architecture, rank, alpha, adapted modules and dtypes of a GGUF LoRA adapter."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise LoraError(f"{path}: not a readable GGUF file ({e})",
                        "pass a .gguf written by `lora export --format gguf` or llama.cpp"
                        ) from None
    meta = {name: _value(field) for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise LoraError(f"{path}: a GGUF model, not a LoRA adapter "
                        f"(general.type = {meta.get('general.type')!r})",
                        "pass the adapter file, e.g. output/chat/chat-lora.gguf")
    ranks, kinds, dtypes, modules = Counter(), Counter(), Counter(), set()
    for t in reader.tensors:
        base, _, part = t.name.rpartition(".")
        modules.add(base)
        kinds[part] += 1
        dtypes[QUANT_NAMES.get(int(t.tensor_type), t.tensor_type.name)] += 1
        if part == "lora_a":
            ranks[int(t.shape[1])] += 1  # ggml order: (in features, rank)
    return {"path": str(path), "format": "gguf", "base_model_version": meta.get(
                "general.architecture", "unknown"),
            "name": meta.get("general.name") or "", "modules": {"model": len(modules)},
            "ranks": sorted(ranks), "alphas": [float(meta.get("adapter.lora.alpha", 0.0))],
            "kinds": dict(kinds), "dtypes": dict(sorted(dtypes.items())),
            "size_bytes": path.stat().st_size, "trigger_words": [],
            "metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float))}}
