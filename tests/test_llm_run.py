"""An LLM run folder: started, checkpointed by the task, exported in all three formats."""

from __future__ import annotations

import hashlib
import json

import pytest
from llm_fixtures import pirate_records, tiny_llama, write_jsonl  # noqa: F401 (fixture)

from loracli.errors import LoraError
from loracli.llm import runexport, runfolder
from loracli.llm import task as llm_task

pytestmark = pytest.mark.slow


def fake_checkpoint(run_dir, step, adapter_state, config, extra=None):
    """A complete checkpoint in `loracli.training.runs`' layout holding only the adapter."""
    from safetensors.torch import save_file

    ckpt = run_dir / "checkpoints" / f"step-{step:06d}"
    (ckpt / "model").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in adapter_state.items()},
              str(ckpt / "model" / "adapter_model.safetensors"))
    (ckpt / "model" / "adapter_config.json").write_text(json.dumps(config))
    files = {rel: hashlib.sha256((ckpt / rel).read_bytes()).hexdigest()
             for rel in ("model/adapter_model.safetensors", "model/adapter_config.json")}
    (ckpt / "state.json").write_text(json.dumps({"step": step, "files": files, **(extra or {})}))
    (ckpt / "COMPLETE").write_text("")
    return ckpt


@pytest.fixture
def trained_run(tmp_path, tiny_llama):
    import torch

    data = write_jsonl(tmp_path / "data" / "pirate.jsonl", pirate_records(8))
    run_dir = tmp_path / "run"
    settings = llm_task.Settings(base=str(tiny_llama), data_dir=str(data), dropout=0.0,
                                 batch_size=4, learning_rate=1e-2)
    t = llm_task.CausalLMTask(run_dir, settings)
    opt = torch.optim.AdamW(t.param_groups())
    for step in range(3):
        t.loss(t.micro_batch(step)).backward()
        opt.step()
        opt.zero_grad()
    state, config = t.adapter_state()["model"]
    mapping = json.loads(json.dumps(
        {k: (sorted(v) if isinstance(v, (set, frozenset)) else getattr(v, "value", v))
         for k, v in config.to_dict().items()}))
    fake_checkpoint(run_dir, 3, state, mapping, {"eval": {"eval_loss": 4.5}})
    (run_dir / "run.json").write_text(json.dumps({"profile": "pirate", "base": {
        "model": str(tiny_llama), "path": str(tiny_llama), "family": "causal-lm"}}))
    return run_dir, t


def test_run_exports_in_every_format(trained_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, t = trained_run
    assert runfolder.is_llm_run(run_dir)
    ids = torch.tensor([t.encoded[0].ids])
    with torch.no_grad():
        t.model.eval()
        want = t.model(ids).logits
    peft_out = runexport.export(run_dir, "peft", dtype="fp32").to_dict()
    assert peft_out["step"] == 3 and peft_out["eval"] == {"eval_loss": 4.5}
    assert peft_out["modules"] == {"model": 4}  # q and v of 2 layers
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        t.base_folder), peft_out["path"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)
    merged = runexport.export(run_dir, "merged", dtype="fp32")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged.path)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    gguf_out = runexport.export(run_dir, "gguf")
    assert gguf_out.path.name == "pirate-lora.gguf" and not gguf_out.already
    # the template the run trained with travels with the exports
    template = (run_dir / "chat_template.jinja").read_text()
    assert (run_dir / "pirate-merged" / "chat_template.jinja").read_text() == template
    # repeating an export succeeds ("already exported"); a different one needs --force
    assert runexport.export(run_dir, "gguf").already
    assert runexport.export(run_dir, "peft", dtype="fp32").already
    with pytest.raises(LoraError, match="already exists") as e:
        runexport.export(run_dir, "peft", dtype="fp16")
    assert "--force" in e.value.hint
    assert not runexport.export(run_dir, "peft", dtype="fp16", force=True).already
    with pytest.raises(LoraError, match="does not apply") as e:
        runexport.export(run_dir, "kohya")
    assert "peft | merged | gguf" in e.value.hint


def test_causal_lm_folders_are_told_apart(tiny_llama, tiny_sd):
    assert runfolder.is_causal_lm(tiny_llama)
    assert not runfolder.is_causal_lm(tiny_sd)


def test_qlora_run_trains_in_4bit_and_merges_into_the_full_precision_base(tmp_path, tiny_llama):
    """QLoRA: the task loads nf4 weights, trains; the merged export folds the adapter into the
    fp32 base (never into the 4-bit one): its logits are the fp32 base + the adapter delta."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "data" / "pirate.jsonl", pirate_records(8))
    run_dir = tmp_path / "run"
    t = llm_task.CausalLMTask(run_dir, llm_task.Settings(
        base=str(tiny_llama), data_dir=str(data), dropout=0.0, batch_size=4, learning_rate=1e-2,
        quantize="4bit", gradient_checkpointing=True, eval_split=0.25))
    from bitsandbytes.nn import Linear4bit

    assert isinstance(t.model.base_model.model.model.layers[0].mlp.up_proj, Linear4bit)
    before = t.evaluate()["eval_loss"]
    opt = torch.optim.AdamW(t.param_groups())
    for step in range(6):
        t.loss(t.micro_batch(step)).backward()
        opt.step()
        opt.zero_grad()
    assert t.evaluate()["eval_loss"] < before
    state, config = t.adapter_state()["model"]
    mapping = json.loads(json.dumps(
        {k: (sorted(v) if isinstance(v, (set, frozenset)) else getattr(v, "value", v))
         for k, v in config.to_dict().items()}))
    fake_checkpoint(run_dir, 6, state, mapping)
    (run_dir / "run.json").write_text(json.dumps({"profile": "q", "base": {
        "model": str(tiny_llama), "path": str(tiny_llama), "family": "causal-lm",
        "quantize": "4bit"}}))
    merged = runexport.export(run_dir, "merged", dtype="fp32")
    got = AutoModelForCausalLM.from_pretrained(merged.path)
    assert "quantization_config" not in json.loads((merged.path / "config.json").read_text())
    oracle = AutoModelForCausalLM.from_pretrained(tiny_llama)
    weights = dict(oracle.named_parameters())
    ids = torch.tensor([t.encoded[0].ids])
    with torch.no_grad():
        for k, a in state.items():
            if ".lora_A." in k:
                name = k.removeprefix("base_model.model.").replace(".lora_A", "")
                weights[name] += 2.0 * (state[k.replace(".lora_A.", ".lora_B.")] @ a)
        torch.testing.assert_close(got(ids).logits, oracle(ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_export_and_inspect_commands_on_an_llm_run(trained_run, cli):
    run_dir, t = trained_run
    r = cli("export", run_dir, "--json")  # the default format of a language-model run: peft
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["format"] == "peft" and out["modules"] == {"model": 4}
    config = json.loads((run_dir / "pirate-peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == t.base_folder.name  # no local path
    assert str(t.base_folder) not in (run_dir / "pirate-peft" / "adapter_config.json").read_text()
    r = cli("export", run_dir, "--format", "gguf", "--json")
    assert r.exit_code == 0, r.output
    gguf_path = json.loads(r.stdout)["path"]
    r = cli("inspect", gguf_path, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["format"] == "gguf" and report["ranks"] == [8] and report["alphas"] == [16.0]
    r = cli("export", run_dir, "--format", "diffusers")
    assert r.exit_code == 1 and "does not apply to a language-model run" in r.stderr
