"""A causal-LM run folder: how `lora train` tells one apart and how it starts.

The layout is the image runs' (`loracli.training.runs`): profile.toml, run.json, dataset.json,
checkpoints/step-N/ (here one component, `model/`, in peft's format), logs/, samples/ (JSONL
answers), plus `chat_template.jinja`, the template the run trains with. `run.json`'s base has
`family = "causal-lm"`: `train`, `resume` and `export` ask that family (`loracli.families.causal_lm`)
for the hooks here, in `loracli.llm.task` and in `loracli.llm.runexport`.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from loracli import atomic
from loracli.errors import LoraError
from loracli.llm import data
from loracli.llm.task import COMPONENT, resolve_base

FAMILY = "causal-lm"


def is_causal_lm(folder: Path) -> bool:
    """A transformers folder of a `…ForCausalLM` (and not a diffusers pipeline)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return False
    try:
        config = json.loads((folder / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def is_causal_lm_base(base: str) -> bool:
    """Whether model.base resolves to a causal LM (how `model.family = "auto"` finds one)."""
    try:
        return is_causal_lm(resolve_base(base))
    except LoraError:  # not a transformers folder, or not cached: the image path reports it
        return False


def start_run(run_dir: Path, profile, version: str, warn=None) -> None:
    """A new LLM run (the family's start hook): the base, the data and `model.quantize` are
    checked before anything is written; then profile.toml, dataset.json and run.json."""
    from loracli.llm.causal import QUANTIZE

    quantize = getattr(profile.model, "quantize", "")
    if quantize not in QUANTIZE:
        raise LoraError(f"model.quantize = {quantize!r} does not apply to a language model",
                        "set model.quantize = \"4bit\" (QLoRA, bitsandbytes) or \"\"")
    base = resolve_base(profile.model.base)
    examples = data.load(profile.data.dir, getattr(profile.data, "format", "auto"))
    commit = base.name if len(base.name) == 40 else None
    repo = None
    if commit:  # a hub-cache snapshot: named by its repo in exports
        from loracli.hub import models

        repo = models.resolve(profile.model.base).repo_id
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "profile.toml", profile.to_toml())
    atomic.write_json(run_dir / "dataset.json", {
        "examples": len(examples), "kinds": data.kinds(examples),
        "fingerprint": data.fingerprint(profile.data.dir)})
    atomic.write_json(run_dir / "run.json", {
        "lora_version": version,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile.name, "components": [COMPONENT],
        "base": {"model": profile.model.base, "path": str(base), "family": FAMILY,
                 "repo": repo, "commit": commit, "quantize": quantize}})


def is_llm_run(run_dir: Path) -> bool:
    try:
        info = json.loads((Path(run_dir) / "run.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return info.get("base", {}).get("family") == FAMILY
