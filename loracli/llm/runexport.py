"""`lora export` for a causal-LM run: a checkpoint as a peft folder, a merged model or GGUF.

Reads the run folder (`loracli.training.runs`' layout; the adapter in `checkpoints/step-N/model/`), the
base model from run.json, and the chat template the run trained with (`chat_template.jinja`),
so every export carries the template and end-of-turn token the model learned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loracli.errors import LoraError
from loracli.families.causal_lm import RUNS
from loracli.llm.task import COMPONENT, TEMPLATE_FILE, resolve_base
from loracli.training import runs

FORMATS = RUNS.formats  # peft, merged, gguf


def _base_folder(info: dict) -> Path:
    base = info.get("base", {})
    path = Path(base.get("path") or "")
    if base.get("path") and (path / "config.json").is_file():
        return path
    return resolve_base(base.get("model") or "")


def default_output(run_dir: Path, name: str, format: str) -> Path:
    return {"peft": run_dir / f"{name}-peft", "merged": run_dir / f"{name}-merged",
            "gguf": run_dir / f"{name}-lora.gguf"}[format]


@dataclass(frozen=True)
class Exported:
    """What `lora export` reports about an LLM export (the image exports' fields, plus eval)."""

    path: Path
    format: str
    name: str
    step: int
    dtype: str
    modules: dict = field(default_factory=dict)
    already: bool = False
    base: str = ""
    eval: dict = field(default_factory=dict)
    zero_modules: int = 0                            # (image exports: modules added for loaders)
    compat: list = field(default_factory=list)       # (image exports: per-loader coverage)

    @property
    def warnings(self) -> list[str]:
        return []

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "name": self.name,
                "step": self.step, "dtype": self.dtype, "modules": self.modules,
                "already_exported": self.already, "base": self.base, "eval": self.eval}


def export(run_dir: Path, format: str = "peft", step: int | None = None, dtype: str = "fp16",
           output: str | Path | None = None, name: str | None = None, force: bool = False,
           weight: float = 1.0, keep_paths: bool = False) -> Exported:
    """Write one export of an LLM run (peft folder, merged model folder or GGUF adapter).

    The base model is named as `loracli.exporting.provenance` names it (repo id, or a local folder's base
    name; the full path only with `keep_paths`), so an export shows no local paths."""
    from safetensors.torch import load_file

    from loracli.exporting import provenance
    from loracli.llm import causal, exports, llamacpp

    if format not in FORMATS:
        raise LoraError(f"--format {format} does not apply to a language-model run",
                        f"use --format {' | '.join(FORMATS)}")
    if weight != 1.0 and format != "merged":
        raise LoraError("--weight only applies to --format merged",
                        "llama.cpp and peft take the strength when they load the adapter")
    run_dir = Path(run_dir)
    info = runs.info(run_dir)
    checkpoint = runs.latest(run_dir, step)
    folder = checkpoint.path / COMPONENT
    state = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text("utf-8"))
    facts = json.loads((checkpoint.path / "state.json").read_text("utf-8"))
    base = _base_folder(info)
    identity = provenance.base_identity(info.get("base", {}), keep_paths)
    base_name = identity.path or identity.name
    name = name or info.get("profile") or run_dir.name
    target = Path(output).expanduser() if output else default_output(run_dir, name, format)
    tokenizer = causal.load_tokenizer(base)
    template_path = run_dir / TEMPLATE_FILE
    template = template_path.read_text("utf-8") if template_path.is_file() \
        else tokenizer.chat_template
    if format == "gguf":
        already = llamacpp.write(target, state, config, base, dtype, name, force)
    elif format == "peft":
        already = exports.write_peft(target, state, config, tokenizer, template, base_name,
                                     dtype, force)
    else:
        roots = [] if keep_paths else [str(base), str(run_dir.resolve())]
        already = exports.write_merged(target, base, state, config, tokenizer, template, dtype,
                                       weight, force, base_name, roots)
    return Exported(target, format, name, checkpoint.step, dtype,
                    {COMPONENT: len([k for k in state if ".lora_A." in k])}, already, base_name,
                    facts.get("eval") or {})
