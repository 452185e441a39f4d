"""`lora demo --llm`: offline, through `lora train`'s code path, and the LoRA visibly learns."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_llm_demo_teaches_the_pattern(tmp_path, cli):
    import gguf

    from loracli.llm import demo

    r = cli("demo", "--llm", "-o", tmp_path / "demo", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["status"] == "finished" and out["steps"] == demo.STEPS
    assert all(a["lora"].startswith("Arr, matey! Aye aye") for a in out["answers"]), out
    assert not any(a["base"].startswith("Arr") for a in out["answers"])
    assert out["lora_loss"] < out["base_loss"] - 1.0
    assert out["peft"].endswith("llm-demo-peft")
    assert (tmp_path / "demo" / "run" / "llm-demo-peft" / "adapter_model.safetensors").is_file()
    assert gguf.GGUFReader(out["gguf"]).fields["adapter.type"].contents() == "lora"
    assert (tmp_path / "demo" / "run" / "samples" / f"step-{demo.STEPS:06d}.jsonl").is_file()
    assert json.loads((tmp_path / "demo" / demo.RESULT).read_text())["answers"] == out["answers"]
    # the same command again: a finished demo is replaced, never half-mixed with the old one
    again = cli("demo", "--llm", "-o", tmp_path / "demo", "--steps", "2", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["steps"] == 2
