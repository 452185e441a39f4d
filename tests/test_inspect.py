"""`lora inspect` on kohya, diffusers and peft files: ours, and ones written by diffusers and peft."""

from __future__ import annotations

import json

import pytest
from export_fixtures import (ADAPTER, TEXT_TARGETS, UNET_TARGETS, load_component, lora_config,
                             make_run)

from loracli.errors import LoraError
from loracli.exporting import export as exporting
from loracli.exporting import inspection

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sd):
    return make_run(tmp_path_factory.mktemp("inspect") / "anime", tiny_sd, "sd1", rank=4, alpha=6.0)


def _adapted(base, component, rank, alpha):
    """A base component with a fresh, nonzero peft adapter (as a third-party trainer leaves it)."""
    import torch
    from peft import inject_adapter_in_model

    model = load_component(base, component)
    targets = UNET_TARGETS if component == "unet" else TEXT_TARGETS
    inject_adapter_in_model(lora_config(rank, alpha, targets), model, adapter_name=ADAPTER)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    return model


def test_our_kohya_export(run, tmp_path):
    path = exporting.export(run, output=tmp_path / "a.safetensors").path
    report = inspection.inspect_lora(path)
    assert report["format"] == "kohya"
    assert report["base_model_version"] == "sd_v1"
    assert report["modules"] == {"text_encoder": 8, "unet": 32}
    assert (report["ranks"], report["alphas"]) == ([4], [6.0])
    assert report["name"] == "anime" and report["trigger_words"] == ["sks style"]
    assert report["dtypes"] == {"F16": 80, "F32": 40}  # tensors fp16, alphas fp32
    assert report["metadata"]["ss_tag_frequency"] == {"10_sks": {"sks style": 3, "red": 2, "lighthouse": 1}}


def test_a_kohya_file_written_by_diffusers_without_metadata(tiny_sd, tmp_path):
    """diffusers' own converter writes alpha = rank (trap 2): inspect reports what is in the file."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet = _adapted(tiny_sd, "unet", rank=2, alpha=8)
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}
    kohya = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(sd).items()}
    assert all(k.startswith("lora_unet_") for k in kohya)
    save_file(kohya, str(tmp_path / "foreign.safetensors"))
    report = inspection.inspect_lora(tmp_path / "foreign.safetensors")
    assert report["format"] == "kohya"
    assert report["modules"] == {"unet": 32}
    assert report["ranks"] == [2] and report["alphas"] == [2.0]
    assert report["base_model_version"] == "unknown"  # no metadata; 32-wide context is no real model
    assert report["metadata"] == {}


def test_a_diffusers_file_written_by_save_lora_weights(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    unet = _adapted(tiny_sd, "unet", rank=4, alpha=2)
    te = _adapted(tiny_sd, "text_encoder", rank=2, alpha=2)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=ADAPTER),
        text_encoder_lora_layers=get_peft_model_state_dict(te, adapter_name=ADAPTER),
        unet_lora_adapter_metadata=lora_config(4, 2, UNET_TARGETS).to_dict(),
        text_encoder_lora_adapter_metadata=lora_config(2, 2, TEXT_TARGETS).to_dict())
    report = inspection.inspect_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert report["format"] == "diffusers"
    assert report["modules"] == {"text_encoder": 8, "unet": 32}
    assert (report["ranks"], report["alphas"]) == ([2, 4], [2.0])
    assert inspection.inspect_lora(tmp_path)["modules"] == report["modules"]  # the folder works too


def test_a_peft_folder_written_by_peft(tiny_sd, tmp_path):
    from peft import get_peft_model

    model = get_peft_model(load_component(tiny_sd, "unet"),
                           lora_config(8, 4, UNET_TARGETS, rslora=True))
    model.save_pretrained(tmp_path / "unet-adapter")
    report = inspection.inspect_lora(tmp_path / "unet-adapter")
    assert report["format"] == "peft"
    assert report["ranks"] == [8] and report["alphas"] == [pytest.approx(4 * 8 ** 0.5)]
    assert report["modules"] == {"model": 32}


def test_our_peft_and_diffusers_exports(run, tmp_path):
    peft = exporting.export(run, format="peft", output=tmp_path / "peft").path
    report = inspection.inspect_lora(peft)
    assert report["format"] == "peft" and report["modules"] == {"text_encoder": 8, "unet": 32}
    assert (report["ranks"], report["alphas"], report["base_model_version"]) == ([4], [6.0], "sd_v1")
    unet_only = inspection.inspect_lora(peft / "unet" / "adapter_model.safetensors")
    assert unet_only["modules"] == {"unet": 32}
    diffusers = exporting.export(run, format="diffusers", output=tmp_path / "d.safetensors").path
    report = inspection.inspect_lora(diffusers)
    assert report["format"] == "diffusers" and report["alphas"] == [6.0]


def test_inspect_command(run, tmp_path, cli):
    path = exporting.export(run, output=tmp_path / "a.safetensors").path
    human = cli("inspect", path)
    assert human.exit_code == 0
    rows = dict(line.split("\t", 1) for line in human.stdout.splitlines())
    assert rows["format"] == "kohya" and rows["rank"] == "4" and rows["alpha"] == "6"
    assert rows["modules"] == "text_encoder 8, unet 32" and rows["base model"] == "sd_v1"
    doc = json.loads(cli("inspect", path, "--json").stdout)
    assert doc["format"] == "kohya" and doc["metadata"]["ss_network_module"] == "networks.lora"


def test_inspect_refuses_what_is_not_a_lora(tiny_sd, tmp_path, cli):
    with pytest.raises(LoraError, match="no LoRA tensors"):
        inspection.inspect_lora(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    broken = cli("inspect", tmp_path / "broken.safetensors")
    assert broken.exit_code == 1 and "not a readable safetensors file" in broken.stderr
    pickle = cli("inspect", tmp_path / "x.ckpt")
    assert pickle.exit_code == 1 and "no such file" in pickle.stderr


def test_inspect_reports_what_each_loader_applies(run, tmp_path, cli):
    """The same per-loader report as at export time, for our file and for a hand-made SD2 file
    whose text-encoder attention has only q/v (A1111 drops it; diffusers refuses the file)."""
    import torch
    from safetensors.torch import save_file

    result = exporting.export(run, output=tmp_path / "a.safetensors")
    assert inspection.inspect_lora(result.path)["compatibility"] == result.compat

    tensors = {}
    for stem in ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te_text_model_encoder_layers_0_self_attn_v_proj",
                 "lora_te_text_model_encoder_layers_0_mlp_fc1",
                 "lora_unet_conv_in"):
        tensors[f"{stem}.lora_down.weight"] = torch.zeros(2, 8)
        tensors[f"{stem}.lora_up.weight"] = torch.zeros(8, 2)
        tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(tmp_path / "sd2.safetensors"), {"ss_base_model_version": "sd_v2"})
    rows = {r["loader"]: r for r in inspection.inspect_lora(tmp_path / "sd2.safetensors")["compatibility"]}
    assert rows["a1111"]["ignored"] == ["lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                                        "lora_te_text_model_encoder_layers_0_self_attn_v_proj"]
    assert rows["sd-scripts"]["ignored"] == ["lora_unet_conv_in"]
    assert rows["comfyui"]["ignored"] == [] and rows["diffusers"]["error"] is None  # mlp_fc1 is there
    human = cli("inspect", tmp_path / "sd2.safetensors")
    assert human.exit_code == 0
    assert "AUTOMATIC1111\t2 of 4 modules applied" in human.stdout
    assert "warning: AUTOMATIC1111 ignores 2 of 4 modules" in human.stderr
    assert "self_attn_q_proj" in human.stderr
