"""A causal-LM run folder: how it starts and how its checkpoints are exported.

The layout is the image runs' (`loracli.runs`): profile.toml, run.json, dataset.json,
checkpoints/step-N/ (here one component, `model/`, in peft's format), logs/, samples/ (JSONL
answers), plus `chat_template.jinja`, the template the run trains with. `run.json`'s base has
`family = "causal-lm"`, which is how `train`, `resume` and `export` tell an LLM run apart.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from loracli import atomic
from loracli.errors import LoraError
from loracli.llm import data
from loracli.llm.task import COMPONENT, TEMPLATE_FILE, resolve_base

FAMILY = "causal-lm"
FORMATS = ("peft", "merged", "gguf")


def is_causal_lm(folder: Path) -> bool:
    """A transformers folder of a `…ForCausalLM` (and not a diffusers pipeline)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return False
    try:
        config = json.loads((folder / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


def wants(profile) -> bool:
    """Whether a profile trains a causal LM: model.family says so, or its base is one."""
    family = getattr(profile.model, "family", "auto")
    if family == FAMILY:
        return True
    if family != "auto":
        return False
    try:
        return is_causal_lm(resolve_base(profile.model.base))
    except LoraError:  # not a transformers folder, or not cached: the image path reports it
        return False


def fingerprint(path: str | Path) -> str:
    """A hash of the data files' names and contents (a resumed run warns when it changed)."""
    import hashlib

    h = hashlib.sha256()
    for f in data.files(path):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def recorded_fingerprint(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / "dataset.json").read_text("utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None


def write_start(run_dir: Path, profile, version: str) -> Path:
    """run.json and dataset.json of a new LLM run (the caller has written profile.toml)."""
    base = resolve_base(profile.model.base)
    examples = data.load(profile.data.dir, getattr(profile.data, "format", "auto"))
    commit = base.name if len(base.name) == 40 else None
    atomic.write_json(Path(run_dir) / "dataset.json", {
        "examples": len(examples), "kinds": data.kinds(examples),
        "fingerprint": fingerprint(profile.data.dir)})
    atomic.write_json(Path(run_dir) / "run.json", {
        "lora_version": version,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile.name, "components": [COMPONENT],
        "base": {"model": profile.model.base, "path": str(base), "family": FAMILY,
                 "commit": commit, "quantize": getattr(profile.model, "quantize", "")}})
    return Path(run_dir)


def is_llm_run(run_dir: Path) -> bool:
    try:
        info = json.loads((Path(run_dir) / "run.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return info.get("base", {}).get("family") == FAMILY


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

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "name": self.name,
                "step": self.step, "dtype": self.dtype, "modules": self.modules,
                "already_exported": self.already, "base": self.base, "eval": self.eval}


def export(run_dir: Path, format: str = "peft", step: int | None = None, dtype: str = "fp16",
           output: str | Path | None = None, name: str | None = None, force: bool = False,
           weight: float = 1.0) -> Exported:
    """Write one export of an LLM run (peft folder, merged model folder or GGUF adapter)."""
    from safetensors.torch import load_file

    from loracli import runs
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
    base_name = info.get("base", {}).get("model", "")
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
        already = exports.write_merged(target, base, state, config, tokenizer, template, dtype,
                                       weight, force)
    return Exported(target, format, name, checkpoint.step, dtype,
                    {COMPONENT: len([k for k in state if ".lora_A." in k])}, already, base_name,
                    facts.get("eval") or {})
