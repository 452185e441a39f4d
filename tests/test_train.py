"""`lora train` on the tiny SD1/SD2/SDXL models: outputs, learning, contract layout, no network,
multi-process equivalence, and the re-run rules (resume / refuse a changed profile / --restart)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from train_fixtures import NetworkGuard, adapter_tensors, env, lora_cmd, make_dataset, write_profile

from loracli import profiles
from loracli.errors import LoraError
from loracli.families import loading
from loracli.training import denoiser
from loracli.training import loop as training
from loracli.training import runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """One 40-step SD1 run on a learnable concept, under a network guard."""
    root = tmp_path_factory.mktemp("train-sd1")
    data = make_dataset(root / "data")
    path = write_profile(root / "learn.toml", tiny_sd, data, root / "out",
                         train={"max_steps": 40, "save_steps": 10, "keep_checkpoints": 2,
                                "learning_rate": 3e-3, "scheduler": "constant"})
    guard = NetworkGuard()
    steps, warnings = [], []
    with guard.active(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        run_dir, resumed = runs.start(profiles.load(str(path)), on_warning=warnings.append)
        result = training.run(run_dir, on_step=steps.append, on_warning=warnings.append)
    return {"run": run_dir, "resumed": resumed, "result": result, "steps": steps,
            "guard": guard, "warnings": warnings, "data": data}


def test_run_writes_checkpoints_metrics_plot_and_run_facts(trained, tiny_sd):
    run = trained["run"]
    assert trained["result"].status == "finished" and trained["result"].step == 40
    kept = runs.checkpoints(run)
    assert [c.step for c in kept] == [30, 40] and all(c.complete for c in kept)  # keep 2
    lines = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 41))
    assert {"step", "epoch", "loss", "lr", "seconds", "images_per_s", "memory_mib"} <= set(lines[0])
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = runs.info(run)
    assert info["base"]["family"] == "sd1" and info["base"]["prediction_type"] == "epsilon"
    assert info["base"]["path"] == str(tiny_sd.resolve()) and info["components"] == ["unet"]
    assert info["profile"] == "learn" and info["started_at"].endswith("+00:00")
    dataset = json.loads((run / "dataset.json").read_text())
    assert len(dataset.pop("fingerprint")) == 64
    assert dataset == {"num_images": 6, "resolution": 64,
                       "tag_frequency": {"data": {"sks": 6, "red square": 6, "blue background": 6}},
                       "dirs": {"data": {"img_count": 6, "n_repeats": 1}},
                       "buckets": {"buckets": {"0": {"count": 6, "resolution": [64, 64]}},
                                   "mean_img_ar_error": 0.0}}
    frozen = runs.load_profile(run)
    assert frozen.train.max_steps == 40 and frozen.data.dir == str(trained["data"].resolve())
    assert any("fp32" not in w for w in trained["warnings"]) or trained["warnings"] == []


def test_checkpoint_layout_is_peft_format_per_the_contract(trained, tiny_sd):
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    ckpt = runs.latest(trained["run"]).path
    assert ckpt.name == "step-000040"
    config = json.loads((ckpt / "unet" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["use_rslora"] is False
    assert sorted(config["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 40 and state["epoch"] == 13 and "unet/adapter_model.safetensors" in state["files"]
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    inject_adapter_in_model(LoraConfig(**{k: config[k] for k in ("r", "lora_alpha", "target_modules")}),
                            unet, adapter_name="default")
    expected = get_peft_model_state_dict(unet, adapter_name="default")
    saved = adapter_tensors(ckpt)
    assert sorted(saved) == sorted(f"unet/{k}" for k in expected)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert any(k.startswith("unet/down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A")
               for k in saved)


def test_loss_falls_and_the_lora_lowers_the_denoising_loss(trained):
    losses = [m["loss"] for m in trained["steps"]]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    base = denoiser.evaluate(trained["run"], use_lora=False)
    tuned = denoiser.evaluate(trained["run"])
    assert tuned < base * 0.95, (base, tuned)


def test_training_opens_no_network_connection(trained):
    assert trained["guard"].attempts == []
    guard = NetworkGuard()  # and the guard really refuses: the assertion above can fail
    with guard.active(), pytest.raises(OSError, match="network guard"):
        socket.create_connection(("192.0.2.1", 80), timeout=0.1)
    assert guard.attempts


def test_missing_base_model_names_the_fetch_command(cli, tmp_path):
    data = make_dataset(tmp_path / "data", n=1)
    path = write_profile(tmp_path / "p.toml", "sd15", data, tmp_path / "out")
    result = cli("train", "--config", path)
    assert result.exit_code == 1
    assert "not in the model cache" in result.stderr
    assert "hint: lora fetch sd15" in result.stderr
    assert not (tmp_path / "out").exists()


def test_sdxl_trains_unet_and_both_text_encoders(tiny_sdxl, tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    path = write_profile(tmp_path / "xl.toml", tiny_sdxl, data, tmp_path / "out",
                         lora={"train_text_encoder": True},
                         train={"max_steps": 2, "save_steps": 2, "batch_size": 2,
                                "gradient_checkpointing": True},
                         sample={"prompts": ["sks, red square"], "every_steps": 2, "steps": 2})
    run_dir, _ = runs.start(profiles.load(str(path)))
    result = training.run(run_dir)
    assert result.status == "finished"
    assert runs.info(run_dir)["components"] == ["unet", "text_encoder", "text_encoder_2"]
    saved = adapter_tensors(runs.latest(run_dir).path)
    # transformers 5: CLIPTextModel paths start at encoder.layers, the projection model's at text_model
    for te, prefix in (("unet", "down_blocks."), ("text_encoder", "encoder.layers."),
                       ("text_encoder_2", "text_model.encoder.layers.")):
        keys = [k for k in saved if k.startswith(te + "/")]
        assert keys and any(k.split("/", 1)[1].startswith(prefix) for k in keys)
        if te != "unet":
            assert all(k.split("/", 1)[1].startswith(prefix) for k in keys)
        # every part trained, through gradient checkpointing too
        assert any(v.abs().sum() > 0 for k, v in saved.items()
                   if k.startswith(te + "/") and "lora_B" in k)
    assert runs.info(run_dir)["base"]["family"] == "sdxl"
    _assert_sample(run_dir / "samples" / "step-000002-00.png")


def _assert_sample(path):
    from PIL import Image

    with Image.open(path) as im:
        assert im.size == (64, 64)


def test_sd2_is_detected_as_v_prediction(tiny_sd2, tmp_path):
    """Also: epochs instead of steps, a VAE override, samples at checkpoints."""
    data = make_dataset(tmp_path / "data", n=2)
    path = write_profile(tmp_path / "v.toml", tiny_sd2, data, tmp_path / "out",
                         model={"vae": str(tiny_sd2)},
                         train={"max_steps": 0, "epochs": 1, "save_steps": 1,
                                "min_snr_gamma": 5.0},
                         sample={"prompts": ["a", "b"], "every_steps": 1, "steps": 2})
    run_dir, _ = runs.start(profiles.load(str(path)))
    steps = []
    result = training.run(run_dir, on_step=steps.append)
    assert result.status == "finished" and result.max_steps == 1  # 2 images, batch 2
    assert [Path(p).name for p in steps[0]["samples"]] == ["step-000001-00.png", "step-000001-01.png"]
    _assert_sample(run_dir / "samples" / "step-000001-01.png")
    base = runs.info(run_dir)["base"]
    assert (base["family"], base["prediction_type"]) == ("sd2", "v_prediction")


def test_two_gloo_processes_match_one_with_the_same_global_batch(tiny_sd, tmp_path):
    data = make_dataset(tmp_path / "data", n=6)
    common = {"max_steps": 3, "save_steps": 3, "learning_rate": 1e-4}
    one = write_profile(tmp_path / "one.toml", tiny_sd, data, tmp_path / "one",
                        train={**common, "batch_size": 2})
    two = write_profile(tmp_path / "two.toml", tiny_sd, data, tmp_path / "two",
                        train={**common, "batch_size": 1})
    run_one, _ = runs.start(profiles.load(str(one)))
    training.run(run_one)
    proc = subprocess.run(lora_cmd("train", "--config", two, "--processes", 2, "--json"),
                          capture_output=True, text=True, timeout=240, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["status"] == "finished"
    assert json.loads((tmp_path / "two" / "checkpoints" / "step-000003" / "state.json")
                      .read_text())["processes"] == 2
    a = adapter_tensors(runs.latest(run_one).path)
    b = adapter_tensors(runs.latest(tmp_path / "two").path)
    assert sorted(a) == sorted(b)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k]).abs().max().item() for k in a if "lora_B" in k)
    assert moved > 1e-4 and diff < 1e-5, (moved, diff)


def test_rerun_resumes_refuses_a_changed_profile_and_restart_keeps_the_old_run(cli, tiny_sd, tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    path = write_profile(tmp_path / "p.toml", tiny_sd, data, tmp_path / "out",
                         train={"max_steps": 2, "save_steps": 1, "keep_checkpoints": 1})
    first = cli("train", "--config", path, "--json")
    assert first.exit_code == 0, first.stderr
    assert json.loads(first.stdout)["status"] == "finished"

    again = cli("train", "--config", path)
    assert again.exit_code == 0
    assert "is finished (step 2/2)" in again.stderr and "--steps" in again.stderr

    changed = cli("train", "--config", path, "--set", "train.learning_rate=0.002")
    assert changed.exit_code == 1
    assert "changed since the run" in changed.stderr
    assert "train.learning_rate: 0.001 → 0.002" in changed.stderr
    assert f"lora train --config {path} --restart" in changed.stderr and "lora resume" in changed.stderr

    longer = cli("train", "--config", path, "--set", "train.max_steps=5")
    assert longer.exit_code == 1 and "--until-step 5" in longer.stderr

    restarted = cli("train", "--config", path, "--set", "train.learning_rate=0.002", "--restart")
    assert restarted.exit_code == 0, restarted.stderr
    old = [p for p in tmp_path.iterdir() if p.name.startswith("out.")]
    assert len(old) == 1 and (runs.latest(old[0]).step == 2)
    assert runs.load_profile(tmp_path / "out").train.learning_rate == 0.002
    with pytest.raises(LoraError, match="no such model"):
        runs.start(profiles.load(str(path), ["model.base='./missing'", "train.output_dir='x'"]))


def _run_with_third_loss(tiny_sd, tmp_path, monkeypatch, third):
    """Train 6 steps (checkpoint every 2) with the third loss replaced by `third(real_loss)`."""
    from loracli.training import denoiser

    data = make_dataset(tmp_path / "data", n=2)
    path = write_profile(tmp_path / "p.toml", tiny_sd, data, tmp_path / "out",
                         train={"max_steps": 6, "save_steps": 2})
    real, calls = denoiser.Model.loss, []

    def loss(self, *args, **kwargs):
        calls.append(1)
        return third(lambda: real(self, *args, **kwargs)) if len(calls) == 3 else \
            real(self, *args, **kwargs)

    monkeypatch.setattr(denoiser.Model, "loss", loss)
    run_dir, _ = runs.start(profiles.load(str(path)))
    with pytest.raises(LoraError) as e:
        training.run(run_dir)
    return run_dir, e.value


def test_nan_loss_stops_with_the_last_good_checkpoint_kept(tiny_sd, tmp_path, monkeypatch):
    import torch

    run_dir, error = _run_with_third_loss(tiny_sd, tmp_path, monkeypatch,
                                          lambda real: real() * torch.tensor(float("nan")))
    assert "loss became nan at step 3" in error.message
    assert "step-000002" in error.message and "learning_rate" in error.hint
    assert runs.latest(run_dir).step == 2


def test_out_of_memory_names_the_settings_that_reduce_memory(tiny_sd, tmp_path, monkeypatch):
    def oom(real):  # what torch raises when the GPU is full
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    run_dir, error = _run_with_third_loss(tiny_sd, tmp_path, monkeypatch, oom)
    assert "out of GPU memory at step 3" in error.message
    for setting in ("train.batch_size", "train.gradient_checkpointing", "lora resume"):
        assert setting in error.hint
    assert runs.latest(run_dir).step == 2  # the work before it is kept for the resume


def test_single_file_checkpoint_needs_its_configs_in_the_cache(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    ckpt = tmp_path / "v1-5-pruned.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((1,), np.float32)},
              str(ckpt))
    with pytest.raises(LoraError, match="single-file checkpoint") as e:
        loading.resolve_base(str(ckpt))
    assert e.value.hint == "lora fetch sd15"
    xl = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.x": np.zeros((1,), np.float32)}, str(xl))
    with pytest.raises(LoraError) as e:
        loading.resolve_base(str(xl))
    assert e.value.hint == "lora fetch sdxl"


def test_single_file_checkpoint_trains_like_its_diffusers_folder(tiny_sd, tmp_path, isolated):
    """A WebUI-style .safetensors base, its configs from the cache (as `lora fetch sd15` leaves
    them), offline: the first step's loss equals the diffusers folder's to the bit."""
    from train_fixtures import to_single_file

    repo = isolated["cache"] / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    commit = "0" * 40
    shutil.copytree(tiny_sd, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    single = to_single_file(tiny_sd, tmp_path / "v1-5-pruned.safetensors")
    data = make_dataset(tmp_path / "data", n=2)
    losses = {}
    for name, base in (("file", single), ("folder", tiny_sd)):
        path = write_profile(tmp_path / f"{name}.toml", base, data, tmp_path / name,
                             train={"max_steps": 1, "save_steps": 1})
        run_dir, _ = runs.start(profiles.load(str(path)))
        steps = []
        with NetworkGuard().active() as guard:
            training.run(run_dir, on_step=steps.append)
        assert guard.attempts == []
        losses[name] = steps[0]["loss"]
    info = runs.info(tmp_path / "file")["base"]
    assert info["path"] == str(single) and info["family"] == "sd1"
    assert info["config_dir"] == str(repo / "snapshots" / commit)
    assert losses["file"] == losses["folder"]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda(tiny_sdxl, tmp_path, precision):
    data = make_dataset(tmp_path / "data", n=4)
    path = write_profile(tmp_path / "gpu.toml", tiny_sdxl, data, tmp_path / "out",
                         lora={"train_text_encoder": True},
                         train={"max_steps": 4, "save_steps": 2, "mixed_precision": precision,
                                "gradient_checkpointing": True})
    run_dir, _ = runs.start(profiles.load(str(path)))
    steps = []
    assert training.run(run_dir, on_step=steps.append).status == "finished"
    assert all(m["memory_mib"] > 0 and m["loss"] == m["loss"] for m in steps)
    import torch

    assert all(v.dtype == torch.float32 for v in adapter_tensors(runs.latest(run_dir).path).values())


def test_dora_and_rslora_train_and_record_their_config(tiny_sd, tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    path = write_profile(tmp_path / "dora.toml", tiny_sd, data, tmp_path / "out",
                         lora={"dora": True, "rslora": True, "rank": 4, "alpha": 8},
                         train={"max_steps": 2, "save_steps": 2})
    run_dir, _ = runs.start(profiles.load(str(path)))
    assert training.run(run_dir).status == "finished"
    ckpt = runs.latest(run_dir).path
    config = json.loads((ckpt / "unet" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    assert any("lora_magnitude_vector" in k for k in adapter_tensors(ckpt))
