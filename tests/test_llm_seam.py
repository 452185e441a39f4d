"""The family is the one seam for a second kind of run: a toy text family registered here (not
in `loracli`) is started, trained by the real loop, exported and inspected through the registry,
exactly as the causal LM is (`loracli.families.causal_lm`). Plus two LLM messages: the resume
refusal counts sequences, and `lora inspect` on a peft folder shows the base it records."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loracli import families
from loracli.errors import LoraError
from loracli.families.base import Configs, RunKind

HOOKS = __name__  # the hooks below are "module:attribute" references into this test module
CALLS: list = []


def start_toy(run_dir: Path, profile, version: str, warn) -> None:
    from loracli import atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "profile.toml", profile.to_toml())
    atomic.write_json(run_dir / "run.json", {"profile": profile.name, "lora_version": version,
                                             "base": {"model": profile.model.base,
                                                      "family": "toy-text"}})


class ToyTask:
    """y = 2x by a LoRA on one Linear: the task protocol of `loracli.training.loop`."""

    global_batch = 2
    batches_per_epoch = 4

    def __init__(self, run_dir, profile, accelerator, weight_dtype, resumed, warn, status):
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(0)
        self.config = LoraConfig(r=2, lora_alpha=2, target_modules=["proj"])
        self.model = torch.nn.ModuleDict({"proj": torch.nn.Linear(3, 3)})
        inject_adapter_in_model(self.config, self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)
        self.modules = {"model": self.model}
        self.facts = {"family": "toy-text"}

    def param_groups(self):
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": 0.1}]

    def prepared(self, modules):
        self.wrapped = modules["model"]

    def micro_batch(self, index):
        import torch

        x = torch.randn(2, 3, generator=torch.Generator().manual_seed(index))
        return x, 2 * x

    def loss(self, batch):
        x, y = batch
        return ((self.wrapped["proj"](x) - y) ** 2).mean()

    def adapter_state(self):
        return {"model": ({k: v for k, v in self.model.state_dict().items() if "lora_" in k},
                          self.config)}

    def load_adapter_state(self, adapters):
        self.model.load_state_dict(adapters["model"], strict=False)

    def samples(self, step):
        return []


def export_toy(run_dir, format, step, dtype, output, name, force, weight, keep_paths):
    CALLS.append(("export", Path(run_dir).name, format))
    return format


def inspect_toy(path):
    CALLS.append(("inspect", Path(path).name))
    return {"format": "toy"}


@dataclass(frozen=True)
class ToyText:
    """A non-diffusion family that exists only in this test."""

    name: str = "toy-text"
    components: tuple = ("model",)
    denoiser: str = "model"
    trainable: tuple = ("model",)
    text_encoders: tuple = ()
    tokenizers: tuple = ()
    pipeline: str = ""
    unet_targets: tuple = ("proj",)
    text_targets: tuple = ()
    kohya_prefixes: dict = field(default_factory=dict)
    kohya_unet_layout: str = ""
    base_version: str = "toy-text"
    ss_v2: bool = False
    modelspec_prefix: str = "toy-text"
    context_width: int | None = None
    openclip_encoders: tuple = ()
    projection_encoders: tuple = ()
    runs: RunKind = RunKind(start=f"{HOOKS}:start_toy", task=f"{HOOKS}:ToyTask",
                            export=f"{HOOKS}:export_toy", formats=("notes", "bundle"),
                            unit="notes", inspect=f"{HOOKS}:inspect_toy", inspects=(".toy",))

    def recognizes(self, configs: Configs) -> bool:
        return False

    def recognizes_checkpoint(self, keys) -> bool:
        return False

    def claims_base(self, base: str) -> bool:
        return base.startswith("toy:")


@pytest.fixture
def toy_family():
    family = families.register(ToyText())
    CALLS.clear()
    yield family
    families.unregister(family.name)


def _profile(tmp_path, base="toy:numbers"):
    import tomli_w

    from loracli import profiles

    path = tmp_path / "toy.toml"
    path.write_text(tomli_w.dumps({
        "model": {"base": base}, "data": {"dir": str(tmp_path)},
        "train": {"max_steps": 2, "save_steps": 1, "batch_size": 2, "mixed_precision": "no",
                  "scheduler": "constant", "output_dir": str(tmp_path / "run")}}), "utf-8")
    return profiles.load(str(path))


def test_a_family_registered_outside_loracli_starts_exports_and_inspects(toy_family, tmp_path):
    from loracli.exporting import export, inspection
    from loracli.training import runs

    assert families.for_base("auto", "toy:numbers") is toy_family
    assert families.for_base("auto", "sd15").runs is families.get("sd1").runs
    run_dir, resumed = runs.start(_profile(tmp_path))
    assert not resumed and json.loads((run_dir / "run.json").read_text())["base"]["family"] \
        == "toy-text"
    assert runs.family_of(run_dir) is toy_family
    assert export.export(run_dir) == "notes"  # the family's first format is the default
    assert export.export(run_dir, "bundle") == "bundle"
    (tmp_path / "a.toy").write_text("x")
    assert inspection.inspect_lora(tmp_path / "a.toy") == {"format": "toy"}
    assert CALLS == [("export", "run", "notes"), ("export", "run", "bundle"),
                     ("inspect", "a.toy")]


@pytest.mark.slow
def test_the_loop_trains_the_familys_task_and_names_its_unit_on_a_batch_change(toy_family,
                                                                              tmp_path):
    from loracli.training import loop, runs

    run_dir, _ = runs.start(_profile(tmp_path))
    done = loop.run(run_dir)
    assert done.status == "finished" and done.step == 2
    losses = [json.loads(line)["loss"] for line in
              (run_dir / "logs" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and losses[-1] < losses[0]  # the toy task's LoRA learned something
    state = run_dir / "checkpoints" / "step-000002" / "state.json"
    facts = json.loads(state.read_text())
    state.write_text(json.dumps({**facts, "global_batch": 6}))
    with pytest.raises(LoraError, match="global batch of 6 notes; now it would be 2"):
        loop.run(run_dir, extra_steps=1)


def test_causal_lm_runs_count_sequences_and_export_peft_by_default():
    kind = families.get("causal-lm").runs
    assert kind.unit == "sequences" and kind.formats[0] == "peft"
    assert families.for_base("causal-lm", "anything").name == "causal-lm"
    assert all(f.runs.unit == "images" for f in families.all() if f.name != "causal-lm")


def test_inspect_shows_the_base_a_peft_adapter_records(tmp_path, cli):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "chat-peft"
    folder.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               torch.zeros(4, 16),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
               torch.zeros(16, 4)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "base_model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}))
    r = cli("inspect", folder, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and report["ranks"] == [4]
    r = cli("inspect", folder)
    assert r.exit_code == 0, r.output
    row = next(line for line in r.stdout.splitlines() if "base model" in line)
    assert "Qwen/Qwen2.5-0.5B-Instruct" in row and "unknown" not in row
