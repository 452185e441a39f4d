"""Causal language models (transformers `…ForCausalLM`): the family whose runs are LLM LoRA.

Its runs have their own start (chat/instruction data, a transformers base), task, exports
(peft, merged, GGUF) and inspection, all in `loracli.llm`; this module only names them
(`RUNS`) and answers what the registry and the export tables ask of every family. The diffusion
members of the interface (geometry, encode, objective, …) are asked by the diffusion task only,
so a causal LM has none. A profile with `model.family = "auto"` is trained as a causal LM when its
base resolves to a folder whose config.json names a `…ForCausalLM` (`claims_base`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from loracli.families.base import Configs, RunKind

RUNS = RunKind(start="loracli.llm.runfolder:start_run",
               task="loracli.llm.task:CausalLMTask.for_run",
               export="loracli.llm.runexport:export",
               formats=("peft", "merged", "gguf"), unit="sequences",
               inspect="loracli.llm.inspection:inspect_gguf", inspects=(".gguf",))


@dataclass(frozen=True)
class CausalLM:
    """A decoder-only transformer trained with LoRA on its attention/MLP projections."""

    name: str = "causal-lm"          # run.json's base.family (`loracli.llm.runfolder.FAMILY`)
    components: tuple[str, ...] = ("model",)
    denoiser: str = "model"          # the one trained module (checkpoints/step-N/model/)
    trainable: tuple[str, ...] = ("model",)
    text_encoders: tuple[str, ...] = ()
    tokenizers: tuple[str, ...] = ("tokenizer",)
    pipeline: str = ""
    unet_targets: tuple[str, ...] = ("q_proj", "v_proj")  # `loracli.llm.causal.DEFAULT_TARGETS`
    text_targets: tuple[str, ...] = ()
    kohya_prefixes: Mapping[str, str] = field(default_factory=dict)  # no kohya layout
    kohya_unet_layout: str = ""
    base_version: str = "causal-lm"
    ss_v2: bool = False
    modelspec_prefix: str = "causal-lm"
    context_width: int | None = None
    openclip_encoders: tuple[str, ...] = ()
    projection_encoders: tuple[str, ...] = ()
    runs: RunKind = RUNS

    def recognizes(self, configs: Configs) -> bool:
        return False  # a diffusers folder (model_index.json) is never a causal LM

    def recognizes_checkpoint(self, keys: list[str]) -> bool:
        return False  # single-file checkpoints are diffusion models

    def claims_base(self, base: str) -> bool:
        from loracli.llm import runfolder

        return runfolder.is_causal_lm_base(base)


FAMILIES = (CausalLM(),)
