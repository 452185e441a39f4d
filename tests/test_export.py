"""`lora export` on a tiny SD1 run: each format loaded back by its real loader reproduces the
trained model (peft on the base, rebuilt from the checkpoint), and the metadata is right."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from export_fixtures import (FP16_RELATIVE_BOUND, make_run, outputs, pipeline_outputs,
                             reference_models)

from loracli.errors import LoraError
from loracli.exporting import export as exporting

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tiny_sd):
    """A run with alpha ≠ rank (r=4, alpha=6) on UNet and text encoder; its trained outputs."""
    run = make_run(tmp_path_factory.mktemp("sd1") / "anime", tiny_sd, "sd1", rank=4, alpha=6.0)
    from export_fixtures import load_component

    base = outputs({"unet": load_component(tiny_sd, "unet").eval(),
                    "text_encoder": load_component(tiny_sd, "text_encoder").eval()}, "sd1")
    return {"run": run, "base": tiny_sd, "trained": outputs(reference_models(run), "sd1"),
            "untrained": base}


def _pipe(base):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(base, safety_checker=None)


def _max_diff(a: dict, b: dict) -> dict:
    return {k: (a[k] - b[k]).abs().max().item() for k in a}


def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_kohya_fp32_loaded_by_diffusers_reproduces_the_trained_model(sd1, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "anime.safetensors"
    result = exporting.export(sd1["run"], dtype="fp32", output=out)
    assert result.path == out and result.modules == {"unet": 32, "text_encoder": 8}
    keys = load_file(str(out))
    te = [k for k in keys if k.startswith("lora_te")]
    assert te and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te)
    assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_",
                             "lora_te_")) for k in keys)
    assert {keys[k].item() for k in keys if k.endswith(".alpha")} == {6.0}  # lora_alpha, not rank

    pipe = _pipe(sd1["base"])
    pipe.load_lora_weights(str(out))
    got = pipeline_outputs(pipe, "sd1")
    effect = _max_diff(sd1["trained"], sd1["untrained"])
    assert min(effect.values()) > 0.05  # the LoRA really changes both outputs
    assert max(_max_diff(got, sd1["trained"]).values()) <= 1e-6


def test_kohya_fp16_stays_within_a_bound_relative_to_the_lora_effect(sd1, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "anime16.safetensors"
    exporting.export(sd1["run"], output=out)  # fp16 is the default
    assert {str(t.dtype) for k, t in load_file(str(out)).items() if not k.endswith(".alpha")} == {"torch.float16"}
    pipe = _pipe(sd1["base"])
    pipe.load_lora_weights(str(out))
    diff = _max_diff(pipeline_outputs(pipe, "sd1"), sd1["trained"])
    effect = _max_diff(sd1["trained"], sd1["untrained"])
    for component in diff:
        assert diff[component] <= FP16_RELATIVE_BOUND * effect[component], (component, diff, effect)
        assert diff[component] > 0  # fp16 really was stored


def test_strength_via_set_adapters_equals_merged_export_at_that_weight(sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    kohya = tmp_path / "anime.safetensors"
    exporting.export(sd1["run"], dtype="fp32", output=kohya)
    pipe = _pipe(sd1["base"])
    pipe.load_lora_weights(str(kohya), adapter_name="anime")
    pipe.set_adapters(["anime"], adapter_weights=[0.8])
    at_08 = pipeline_outputs(pipe, "sd1")

    merged = exporting.export(sd1["run"], format="merged", dtype="fp32", weight=0.8,
                              output=tmp_path / "merged-08")
    fused = pipeline_outputs(StableDiffusionPipeline.from_pretrained(merged.path), "sd1")
    assert max(_max_diff(at_08, fused).values()) <= 1e-5
    # and 0.8 is neither the full effect nor none of it
    assert min(_max_diff(at_08, sd1["trained"]).values()) > 1e-3


def test_merged_folder_loads_with_from_pretrained_and_matches(sd1, tmp_path):
    from diffusers import DiffusionPipeline

    result = exporting.export(sd1["run"], format="merged", dtype="fp32", output=tmp_path / "merged")
    pipe = DiffusionPipeline.from_pretrained(result.path)
    assert max(_max_diff(pipeline_outputs(pipe, "sd1"), sd1["trained"]).values()) <= 1e-5


def test_peft_export_loads_with_peft_and_matches(sd1, tmp_path):
    from export_fixtures import load_component
    from peft import PeftModel

    result = exporting.export(sd1["run"], format="peft", dtype="fp32", output=tmp_path / "peft")
    assert sorted(p.name for p in result.path.iterdir()) == ["text_encoder", "unet"]
    models = {c: PeftModel.from_pretrained(load_component(sd1["base"], c), result.path / c).eval()
              for c in ("unet", "text_encoder")}
    assert max(_max_diff(outputs(models, "sd1"), sd1["trained"]).values()) <= 1e-6


def test_diffusers_format_loads_with_load_lora_weights_and_matches(sd1, tmp_path):
    result = exporting.export(sd1["run"], format="diffusers", dtype="fp32", output=tmp_path / "d")
    assert result.path == tmp_path / "d" / "pytorch_lora_weights.safetensors"
    assert json.loads(_header(result.path)["lora_adapter_metadata"])["unet.lora_alpha"] == 6.0
    pipe = _pipe(sd1["base"])
    pipe.load_lora_weights(str(result.path.parent))
    assert max(_max_diff(pipeline_outputs(pipe, "sd1"), sd1["trained"]).values()) <= 1e-6


def test_rslora_run_exports_alpha_times_sqrt_rank(tmp_path, tiny_sd):
    from safetensors.torch import load_file

    run = make_run(tmp_path / "rs", tiny_sd, "sd1", rank=8, alpha=4.0, rslora=True, seed=3)
    trained = outputs(reference_models(run), "sd1")
    result = exporting.export(run, dtype="fp16")  # alpha stays fp32 even in an fp16 file
    alphas = {t.item() for k, t in load_file(str(result.path)).items() if k.endswith(".alpha")}
    assert len(alphas) == 1 and alphas.pop() == pytest.approx(4.0 * math.sqrt(8), rel=1e-7)
    assert _header(result.path)["ss_network_alpha"] == repr(4.0 * math.sqrt(8))
    assert json.loads(_header(result.path)["ss_network_args"]) == {"rslora": "True"}
    fp32 = exporting.export(run, dtype="fp32", output=tmp_path / "rs32.safetensors")
    pipe = _pipe(tiny_sd)
    pipe.load_lora_weights(str(fp32.path))
    assert max(_max_diff(pipeline_outputs(pipe, "sd1"), trained).values()) <= 1e-6


def test_metadata_for_webui_and_model_sites(sd1, tmp_path):
    out = tmp_path / "meta.safetensors"
    exporting.export(sd1["run"], output=out, name="mystyle")
    meta = _header(out)
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "6")
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False")
    assert meta["ss_output_name"] == "mystyle" and meta["modelspec.title"] == "mystyle"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_sks": {"sks style": 3, "red": 2, "lighthouse": 1}}
    assert (meta["ss_steps"], meta["ss_learning_rate"], meta["ss_resolution"]) == ("5", "0.0001", "(64, 64)")
    assert float(meta["ss_training_started_at"]) == 1795827723.0  # 2026-11-28T01:02:03Z
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "sks style"
    assert json.loads(meta["loracli.trigger_words"]) == ["sks style"]
    assert (meta["loracli.base_repo"], meta["loracli.base_commit"]) == ("loracli/tiny-sd", "0" * 40)
    data = out.read_bytes()
    after_header = data[8 + int.from_bytes(data[:8], "little"):]
    assert meta["sshs_model_hash"] == hashlib.sha256(after_header).hexdigest()
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]


def _tamper(run, rename_from, rename_to):
    """Rename one module in the UNet adapter and re-sign state.json, as a buggy trainer would."""
    from safetensors.torch import load_file, save_file

    from loracli.training import runs

    ckpt = runs.latest(run).path
    f = ckpt / "unet" / "adapter_model.safetensors"
    sd = {k.replace(rename_from, rename_to): v for k, v in load_file(str(f)).items()}
    save_file(sd, str(f))
    state = json.loads((ckpt / "state.json").read_text())
    state["files"]["unet/adapter_model.safetensors"] = runs.sha256_file(f)
    (ckpt / "state.json").write_text(json.dumps(state))


def test_a_key_that_maps_to_no_module_is_never_written(tmp_path, tiny_sd):
    run = make_run(tmp_path / "bad", tiny_sd, "sd1", text_encoder=False)
    _tamper(run, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_qq")
    for fmt in ("kohya", "diffusers", "peft", "merged"):
        with pytest.raises(LoraError) as e:
            exporting.export(run, format=fmt)
        assert "do not map onto the base model" in e.value.message
        assert any("attn1.to_qq: no such module" in d for d in e.value.details)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "dataset.json", "profile.toml", "run.json"]


def test_a_run_checked_against_the_wrong_base_is_refused(tmp_path, tiny_sd, tiny_sdxl):
    run = make_run(tmp_path / "wrong", tiny_sd, "sd1", text_encoder=False)
    info = json.loads((run / "run.json").read_text())
    info["base"]["path"] = str(tiny_sdxl)
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(LoraError, match="do not map onto the base model"):
        exporting.export(run)
    assert not (run / "anime.safetensors").exists()


def test_dora_is_refused_for_kohya_and_exact_in_diffusers_merged_and_peft(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    run = make_run(tmp_path / "dora", tiny_sd, "sd1", extra_unet={"use_dora": True})
    trained = outputs(reference_models(run), "sd1")
    with pytest.raises(LoraError, match="DoRA") as e:
        exporting.export(run)
    assert "--format diffusers" in e.value.hint
    assert not (run / "anime.safetensors").exists()

    diffusers = exporting.export(run, format="diffusers", dtype="fp32")
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(str(diffusers.path)))
    pipe = _pipe(tiny_sd)
    pipe.load_lora_weights(str(diffusers.path), adapter_name="dora")
    assert max(_max_diff(pipeline_outputs(pipe, "sd1"), trained).values()) <= 1e-6

    merged = exporting.export(run, format="merged", dtype="fp32")
    fused = pipeline_outputs(StableDiffusionPipeline.from_pretrained(merged.path), "sd1")
    assert max(_max_diff(fused, trained).values()) <= 1e-5
    pipe.set_adapters(["dora"], adapter_weights=[0.8])
    merged_08 = exporting.export(run, format="merged", dtype="fp32", weight=0.8, output=tmp_path / "m08")
    fused_08 = pipeline_outputs(StableDiffusionPipeline.from_pretrained(merged_08.path), "sd1")
    assert max(_max_diff(fused_08, pipeline_outputs(pipe, "sd1")).values()) <= 1e-5

    peft = exporting.export(run, format="peft")
    assert any("lora_magnitude_vector" in k for k in load_file(str(peft.path / "unet" / "adapter_model.safetensors")))


def test_cli_prints_path_and_snippet_refuses_existing_and_force_replaces(sd1, tmp_path, cli):
    out = tmp_path / "cli.safetensors"
    result = cli("export", sd1["run"], "-o", out, "--name", "anime")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [str(out), "<lora:anime:0.8>"]

    again = cli("export", sd1["run"], "-o", out, "--json")  # identical: already exported
    assert again.exit_code == 0 and json.loads(again.stdout)["already_exported"] is True

    before = out.read_bytes()
    refused = cli("export", sd1["run"], "-o", out, "--dtype", "fp32")
    assert refused.exit_code == 1
    assert "already exists" in refused.stderr and "--force" in refused.stderr
    assert out.read_bytes() == before

    forced = cli("export", sd1["run"], "-o", out, "--dtype", "fp32", "--force", "--json")
    assert forced.exit_code == 0
    doc = json.loads(forced.stdout)
    assert doc["dtype"] == "fp32" and doc["prompt"] == "<lora:anime:0.8>" and doc["path"] == str(out)
    assert out.read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_errors_name_the_fix(sd1, tmp_path, cli):
    missing = cli("export", sd1["run"], "--step", "7")
    assert missing.exit_code == 1 and "no checkpoint at step 7" in missing.stderr
    assert "complete checkpoints: 5" in missing.stderr
    weight = cli("export", sd1["run"], "--weight", "0.5")
    assert weight.exit_code == 1 and "--format merged" in weight.stderr
    bad = cli("export", tmp_path, "--json")
    assert bad.exit_code == 1 and json.loads(bad.stdout)["error"].endswith("not a run folder (no run.json or checkpoints/)")


def _configs_only(src, dest):
    """A diffusers folder with every config and no weights (what a single-file base brings)."""
    import shutil

    shutil.copytree(src, dest, ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")])
    return dest


def test_single_file_base_is_checked_against_its_config_folder(tmp_path, tiny_sd):
    from safetensors.torch import load_file

    run = make_run(tmp_path / "single", tiny_sd, "sd1")
    configs = _configs_only(tiny_sd, tmp_path / "configs")
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"stands for an LDM single-file checkpoint")
    info = json.loads((run / "run.json").read_text())
    info["base"].update(path=str(checkpoint), config_dir=str(configs))
    (run / "run.json").write_text(json.dumps(info))
    result = exporting.export(run, dtype="fp32")
    assert result.modules == {"unet": 32, "text_encoder": 8}
    assert len(load_file(str(result.path))) == 3 * 40

    _tamper(run, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_kk")
    with pytest.raises(LoraError, match="do not map onto the base model"):
        exporting.export(run, output=tmp_path / "again.safetensors")
    assert not (tmp_path / "again.safetensors").exists()

    del info["base"]["config_dir"]
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(LoraError, match="single-file checkpoint") as e:
        exporting.export(run, output=tmp_path / "again.safetensors")
    assert e.value.hint.startswith("lora fetch")


def test_sd2_run_exports_v2_metadata_and_loads(tmp_path, tiny_sd2):
    from diffusers import StableDiffusionPipeline

    run = make_run(tmp_path / "v2", tiny_sd2, "sd2", rank=2, alpha=1.0)
    result = exporting.export(run, dtype="fp32")
    meta = _header(result.path)
    assert (meta["ss_v2"], meta["ss_v_parameterization"], meta["ss_base_model_version"]) == ("True", "True", "sd_v2")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2, safety_checker=None)
    pipe.load_lora_weights(str(result.path))
    assert max(_max_diff(pipeline_outputs(pipe, "sd2"), outputs(reference_models(run), "sd2")).values()) <= 1e-6
