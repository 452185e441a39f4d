"""The LLM walkthrough through the CLI: fetch the tiny Llama, train on chat data, SIGKILL,
resume (bit-identical adapter), export peft / merged / GGUF, load them back."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from llm_fixtures import pirate_records, write_jsonl

pytestmark = pytest.mark.slow

STEPS = 24


def profile(root, out, data):
    import tomli_w

    path = root / f"{out.name}.toml"
    path.write_text(tomli_w.dumps({
        "model": {"base": "tiny-llama"},
        "data": {"dir": str(data), "eval_split": 0.25, "max_length": 256},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.1,
                 "targets": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "train": {"max_steps": STEPS, "save_steps": 4, "batch_size": 2,
                  "gradient_accumulation": 2, "learning_rate": 1e-2, "mixed_precision": "no",
                  "scheduler": "constant", "output_dir": str(out)},
        "sample": {"prompts": ["Who are you?"], "every_steps": 12},
    }), "utf-8")
    return path


def test_fetch_train_kill_resume_export_load(tmp_path, cli):
    import torch
    from safetensors.torch import load_file
    from train_fixtures import env, lora_cmd, metrics_steps, wait_for
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracli import profiles
    from loracli.training import loop as training
    from loracli.training import runs

    fetched = cli("fetch", "tiny-llama", "--json")
    assert fetched.exit_code == 0, fetched.output
    data = write_jsonl(tmp_path / "data" / "chat.jsonl", pirate_records(16))

    reference, _ = runs.start(profiles.load(str(profile(tmp_path, tmp_path / "ref", data))))
    done = training.run(reference)
    assert done.status == "finished" and done.step == STEPS
    # held-out loss and perplexity at the last checkpoint, the LoRA's below the base's
    assert done.eval["eval_loss"] < done.eval["base_eval_loss"] - 0.5
    assert done.eval["perplexity"] < done.eval["base_perplexity"]

    out = tmp_path / "killed"
    path = profile(tmp_path, out, data)
    proc = subprocess.Popen(lora_cmd("train", "--config", path), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert wait_for(lambda: 6 in metrics_steps(out), 300, proc), proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert 4 <= runs.latest(out).step < STEPS
    resumed = cli("resume", out, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["status"] == "finished"
    rel = f"step-{STEPS:06d}/model/adapter_model.safetensors"
    assert (out / "checkpoints" / rel).read_bytes() == \
        (reference / "checkpoints" / rel).read_bytes()  # bit for bit
    assert any(v.abs().sum() > 0 for k, v in load_file(out / "checkpoints" / rel).items()
               if "lora_B" in k)
    sample = json.loads((out / "samples" / f"step-{STEPS:06d}.jsonl").read_text().splitlines()[0])
    assert sample["prompt"] == "Who are you?" and sample["answer"].startswith("Arr")

    results = {}
    for fmt in ("peft", "merged", "gguf"):
        r = cli("export", out, "--format", fmt, "--dtype", "fp32", "--json")
        assert r.exit_code == 0, r.output
        results[fmt] = json.loads(r.stdout)
        assert results[fmt]["step"] == STEPS and results[fmt]["format"] == fmt
        assert results[fmt]["eval"]["eval_loss"] == pytest.approx(done.eval["eval_loss"])
    again = cli("export", out, "--format", "gguf", "--dtype", "fp32", "--json")
    assert json.loads(again.stdout)["already_exported"] is True

    merged = results["merged"]["path"]
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        answer = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    text = tok.decode(answer)
    assert text.startswith("Arr, matey! Aye aye") and text.endswith("<|im_end|>")  # it stops
    assert (out / "killed-lora.gguf").is_file()

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(runs.info(out)["base"]["path"])
    peft_model = PeftModel.from_pretrained(base, results["peft"]["path"])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, atol=1e-5,
                                   rtol=1e-5)


def test_the_readme_walkthrough_with_the_tiny_model(tmp_path, cli, monkeypatch):
    """README "Language models": the same commands, with tiny-llama for qwen2.5-0.5b-instruct."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data" / "chat.jsonl", pirate_records(16))
    assert cli("fetch", "tiny-llama").exit_code == 0
    assert cli("profile", "new", "my-chat", "--from", "chat").exit_code == 0
    r = cli("train", "--profile", "my-chat", "--set", "data.dir=./data/chat.jsonl",
            "--set", "model.base=tiny-llama", "--set", "train.max_steps=4",
            "--set", "train.mixed_precision=no", "--set", "data.eval_split=0.25", "--json")
    assert r.exit_code == 0, r.output
    trained = json.loads(r.stdout)
    assert trained["status"] == "finished" and trained["eval"]["eval_tokens"] > 0
    r = cli("resume", "my-chat", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "already-finished"
    for fmt, name in (("peft", "my-chat-peft"), ("merged", "my-chat-merged"),
                      ("gguf", "my-chat-lora.gguf")):
        args = ("export", "my-chat") + (("--format", fmt) if fmt != "peft" else ())
        r = cli(*args, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["path"].endswith(f"output/my-chat/{name}")
    r = cli("inspect", "output/my-chat/my-chat-lora.gguf", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["format"] == "gguf"


def test_qlora_through_the_cli(tmp_path, cli, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data" / "chat.jsonl", pirate_records(8))
    assert cli("fetch", "tiny-llama").exit_code == 0
    r = cli("train", "--profile", "chat-qlora", "--set", "data.dir=./data/chat.jsonl",
            "--set", "model.base=tiny-llama", "--set", "train.max_steps=2",
            "--set", "train.mixed_precision=no", "--set", "train.gradient_accumulation=1",
            "--set", "data.eval_split=0.25", "--json")
    assert r.exit_code == 0, r.output
    run = json.loads(r.stdout)
    assert json.loads((tmp_path / "output" / "chat-qlora" / "run.json").read_text())["base"][
        "quantize"] == "4bit"
    assert run["eval"]["eval_loss"] < run["eval"]["base_eval_loss"]  # it trained in 4 bit
    r = cli("export", "chat-qlora", "--format", "merged", "--json")
    assert r.exit_code == 0, r.output
    config = json.loads((Path(json.loads(r.stdout)["path"]) / "config.json").read_text())
    assert "quantization_config" not in config  # merged into the full-precision base
