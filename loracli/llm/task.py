"""The causal-LM task: what the training loop trains when the base is a language model.

It answers the loop through the task protocol of `loracli.training.loop` (modules, param_groups,
prepared, global_batch, batches_per_epoch, facts, micro_batch, loss, adapter_state,
load_adapter_state, samples) and adds `evaluate()` (held-out loss and perplexity, base vs LoRA).

The loss of a micro-batch is its summed token cross-entropy divided by the answer tokens of the
whole optimizer step (all its micro-batches, on all processes: every process can count them, as
batches are a pure function of (seed, index)), times the factor the loop and DDP divide by again.
So a step's gradient is the mean over the step's answer tokens, however they fall into
micro-batches, and the reported loss is that mean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loracli import atomic
from loracli.errors import LoraError
from loracli.llm import batches, causal, data, templates

TEMPLATE_FILE = "chat_template.jinja"  # in the run folder: the template trained with
COMPONENT = "model"                    # checkpoints/step-N/model/adapter_model.safetensors


@dataclass(frozen=True)
class Settings:
    """Everything the LLM task reads from a profile (defaults where a key does not exist yet)."""

    base: str
    quantize: str = ""
    data_dir: str = "./data/chat.jsonl"
    format: str = "auto"
    max_length: int = 1024
    packing: bool = False
    group_by_length: bool = True
    train_on_prompt: bool = False
    eval_split: float = 0.0
    template: str = ""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    targets: tuple = causal.DEFAULT_TARGETS
    rslora: bool = False
    dora: bool = False
    batch_size: int = 4
    accumulation: int = 1
    seed: int = 42
    gradient_checkpointing: bool = False
    learning_rate: float = 2e-4
    prompts: tuple = ()
    max_new_tokens: int = 64

    @classmethod
    def from_profile(cls, p) -> "Settings":
        def get(section, key, default):
            return getattr(getattr(p, section), key, default)

        from loracli.families.sd import SD1  # whose targets are the profiles' default

        targets = tuple(p.lora.targets)
        if targets == tuple(SD1.unet_targets):  # the image default was kept: use the LLM one
            targets = causal.DEFAULT_TARGETS

        return cls(base=p.model.base, quantize=get("model", "quantize", ""), data_dir=p.data.dir,
                   format=get("data", "format", "auto"),
                   max_length=get("data", "max_length", 1024),
                   packing=get("data", "packing", False),
                   group_by_length=get("data", "group_by_length", True),
                   train_on_prompt=get("data", "train_on_prompt", False),
                   eval_split=get("data", "eval_split", 0.0),
                   template=get("data", "template", ""), rank=p.lora.rank, alpha=p.lora.alpha,
                   dropout=p.lora.dropout, targets=targets, rslora=p.lora.rslora,
                   dora=p.lora.dora, batch_size=p.train.batch_size,
                   accumulation=p.train.gradient_accumulation, seed=p.train.seed,
                   gradient_checkpointing=p.train.gradient_checkpointing,
                   learning_rate=p.train.learning_rate, prompts=tuple(p.sample.prompts),
                   max_new_tokens=get("sample", "max_new_tokens", 64))


def resolve_base(model: str) -> Path:
    """A causal LM folder from a path, an alias or org/name in the cache (never the network)."""
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise LoraError(f"{model}: not a transformers model folder (no config.json)",
                            "set model.base to a folder with config.json, or `lora fetch ORG/NAME`")
        return path.resolve()
    from loracli.hub import models

    return models.local_snapshot(model)


def frozen_template(run_dir: Path, tokenizer, wanted: str, warn, main: bool = True) -> str:
    """The template the run trains with: fixed in the run folder at its start."""
    path = Path(run_dir) / TEMPLATE_FILE
    if path.is_file():
        kept = path.read_text("utf-8")
        if kept != wanted:
            warn("the chat template changed since this run started; it keeps the one it "
                 f"started with ({path})")
        return kept
    if main:
        atomic.write_text(path, wanted)
    return wanted


class CausalLMTask:
    """LoRA on a causal language model's attention (or any linear) projections."""

    def __init__(self, run_dir: Path, settings: Settings, device="cpu", weight_dtype=None,
                 rank: int = 0, processes: int = 1, warn: Callable[[str], None] = lambda _m: None,
                 status: Callable[[str], None] = lambda _m: None, main: bool = True):
        self.run_dir, self.s = Path(run_dir), settings
        self.rank, self.processes = rank, processes
        s = settings
        self.base_folder = resolve_base(s.base)
        self.tokenizer = causal.load_tokenizer(self.base_folder)
        self.template = frozen_template(
            self.run_dir, self.tokenizer,
            templates.resolve(self.tokenizer, s.template), warn, main)
        self.stop_ids = [templates.end_of_turn(self.tokenizer, self.template)[1]]
        status("reading the training data")
        examples = data.load(s.data_dir, s.format)
        train, held = data.split(examples, s.eval_split, s.seed)
        encoder = templates.Encoder(self.tokenizer, self.template, s.max_length, s.train_on_prompt)
        self.encoded = encoder.encode_all(train)
        self.held = encoder.encode_all(held) if held else []
        for message in encoder.warnings():
            warn(message)
        self.global_batch = s.batch_size * processes
        self.plan = batches.Plan(self.encoded, self.global_batch, s.seed,
                                 self.tokenizer.pad_token_id, s.packing, s.max_length,
                                 s.group_by_length)
        self.batches_per_epoch = self.plan.per_epoch
        status("loading the model")
        self.model = causal.inject(
            causal.load_base(self.base_folder, s.quantize, str(device), weight_dtype),
            causal.lora_config(s.rank, s.alpha, s.dropout, s.targets, s.rslora, s.dora),
            s.seed, s.gradient_checkpointing)
        self.modules = {COMPONENT: self.model}
        self.wrapped = self.model
        self.facts = {"family": "causal-lm", "base": s.base, "examples": len(examples),
                      "held_out": len(held), "kinds": data.kinds(examples),
                      "tokens_per_epoch": self.plan.tokens, "template_end": self.stop_ids[0]}

    @classmethod
    def for_run(cls, run_dir: Path, profile, accelerator, weight_dtype, resumed: bool,
                warn: Callable[[str], None], status: Callable[[str], None]) -> "CausalLMTask":
        """The task of an LLM run, as the training loop builds it (DiffusionTask's signature)."""
        settings = Settings.from_profile(profile)
        if resumed:
            recorded = data.recorded_fingerprint(run_dir)
            if recorded not in (None, data.fingerprint(settings.data_dir)):
                warn(f"the data in {settings.data_dir} changed since this run started: the "
                     "resumed run will not match an uninterrupted one")
        return cls(run_dir, settings, accelerator.device, weight_dtype,
                   accelerator.process_index, accelerator.num_processes, warn, status,
                   accelerator.is_main_process)

    # ------------------------------------------------------------------ the task protocol

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad],
                 "lr": self.s.learning_rate}]

    def prepared(self, modules: dict) -> None:
        self.wrapped = modules[COMPONENT]

    def micro_batch(self, index: int) -> dict:
        """Micro-batch `index`: this process's rows, and the step's answer tokens."""
        units = self.plan.units_of(index)
        mine = units[self.rank * self.s.batch_size:(self.rank + 1) * self.s.batch_size]
        rows = [[self.encoded[i] for i in unit] for unit in mine]
        batch = batches.collate(rows, self.plan.pad_id, self.s.packing)
        first = index - index % self.s.accumulation
        batch["step_tokens"] = sum(self.plan.count(m)
                                   for m in range(first, first + self.s.accumulation))
        return batch

    def loss(self, batch: dict):
        """This micro-batch's share of the step's token-mean loss, scaled for the loop's
        division by the accumulation and DDP's averaging over processes."""
        total, _ = causal.loss(self.wrapped, batch)
        return total * (self.s.accumulation * self.processes) / max(1, batch["step_tokens"])

    def adapter_state(self) -> dict:
        return {COMPONENT: (causal.adapter_state(self.model), self.model.peft_config["default"])}

    def load_adapter_state(self, adapters: dict) -> None:
        causal.load_adapter_state(self.model, adapters[COMPONENT])

    def samples(self, step: int) -> list[Path]:
        """Answers to the profile's prompts, as `samples/step-NNNNNN.jsonl`."""
        if not self.s.prompts:
            return []
        answers = causal.generate(self.model, self.tokenizer, self.template, self.s.prompts,
                                  self.stop_ids, self.s.max_new_tokens)
        path = self.run_dir / "samples" / f"step-{step:06d}.jsonl"
        atomic.write_text(path, "".join(json.dumps({"step": step, "prompt": p, "answer": a},
                                                   ensure_ascii=False) + "\n"
                                        for p, a in zip(self.s.prompts, answers)))
        return [path]

    def evaluate(self, base_too: bool = True) -> dict:
        """Held-out loss and perplexity with the LoRA (and without it); {} with no held-out set."""
        if not self.held:
            return {}
        return causal.evaluate(self.model, batches.fixed(self.held, self.s.batch_size,
                                                         self.plan.pad_id), base_too)
