"""FLUX.1 and SD3.5 through the real commands: train (text-encoder outputs cached on disk, then
the encoders freed), SIGKILL, resume bit-identical, export, and load the export in diffusers.

The reference for the exports is the trained transformer rebuilt in the test: the base
transformer with the checkpoint's peft adapter set into it by peft itself.
"""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import weakref

import pytest
from dit_fixtures import tiny_dit_folder
from test_dit_export import FLUX_COMFY, _comfy_merge, _native_base, _transformer_inputs
from train_fixtures import env, lora_cmd, make_dataset, metrics_steps, wait_for, write_profile

from loracli import families, profiles, tiny_dit
from loracli.training import loop as training
from loracli.training import runs

pytestmark = pytest.mark.slow

STEPS = 6
RANDOM = {"data": {"caption_dropout": 0.3, "flip": True},
          "lora": {"dropout": 0.1, "rank": 4, "alpha": 8},
          "train": {"max_steps": STEPS, "save_steps": 2, "batch_size": 2,
                    "gradient_accumulation": 2, "noise_offset": 0.05, "cache_text": True}}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The uninterrupted FLUX.1-dev run (in-process) and what a second run needs."""
    from loracli.families import loading

    root = tmp_path_factory.mktemp("flux")
    base = tiny_dit_folder(tmp_path_factory, "flux-dev")
    data = make_dataset(root / "data", n=5)
    targets = list(families.get("flux-dev").unet_targets)
    sections = {k: dict(v) for k, v in RANDOM.items()}
    sections["lora"]["targets"] = targets
    path = write_profile(root / "reference.toml", base, data, root / "reference", **sections)
    run_dir, _ = runs.start(profiles.load(str(path)))
    loaded, real_load = [], loading.load_components

    def spy(*args, **kwargs):  # remembers (weakly) the T5 the trainer loads
        parts = real_load(*args, **kwargs)
        loaded.append(weakref.ref(parts["text_encoder_2"]))
        return parts

    t5_during_training = []

    def on_step(metrics):
        gc.collect()
        t5_during_training.append(sum(ref() is not None for ref in loaded))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "load_components", spy)
        result = training.run(run_dir, on_step=on_step)
    assert len(loaded) == 1
    assert result.status == "finished" and result.step == STEPS
    return {"root": root, "base": base, "data": data, "sections": sections,
            "reference": run_dir, "t5_alive": t5_during_training}


def _adapter(run_dir, component="transformer"):
    ckpt = runs.latest(run_dir)
    return (ckpt.path / component / "adapter_model.safetensors").read_bytes(), ckpt


def test_text_is_cached_on_disk_and_the_encoders_leave_memory(flux):
    run = json.loads((flux["reference"] / "run.json").read_text())
    assert (run["base"]["family"], run["base"]["prediction_type"]) == ("flux-dev", "flow_matching")
    assert flux["t5_alive"] == [0] * STEPS  # the T5 it loaded is gone while training
    cached = list((flux["reference"] / "cache" / "text").glob("*.safetensors"))
    assert len(cached) == 2  # the one caption, and "" for caption dropout
    from safetensors.torch import load_file

    entry = load_file(str(cached[0]))
    assert entry["hidden"].shape == (tiny_dit.T5_MAX_LENGTH, 32) and entry["pooled"].shape == (32,)


def test_sigkill_then_resume_is_bit_identical(flux):
    root = flux["root"]
    out = root / "killed"
    path = write_profile(root / "killed.toml", flux["base"], flux["data"], out, **flux["sections"])
    proc = subprocess.Popen(lora_cmd("train", "--config", path), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert wait_for(lambda: 3 in metrics_steps(out), 240, proc), proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    first = runs.latest(out).step
    assert 2 <= first < STEPS
    done = subprocess.run(lora_cmd("resume", out), env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got, _ = _adapter(out)
    want, _ = _adapter(flux["reference"])
    assert got == want  # the same file bytes as the run left alone


def _trained_transformer(folder, ckpt):
    """The base transformer with the checkpoint's adapter, set by peft (the reference)."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    config = json.loads((ckpt / "transformer" / "adapter_config.json").read_text())
    config = LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__})
    inject_adapter_in_model(config, transformer, adapter_name="default")
    set_peft_model_state_dict(transformer, load_file(str(ckpt / "transformer" /
                                                         "adapter_model.safetensors")),
                              adapter_name="default")
    return transformer.eval()


def test_exports_reproduce_the_trained_transformer(flux, cli, tmp_path):
    import torch
    from diffusers import FluxPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    run_dir = flux["reference"]
    _, ckpt = _adapter(run_dir)
    trained = _trained_transformer(flux["base"], ckpt.path)
    r = cli("export", str(run_dir), "--format", "diffusers", "--dtype", "fp32", "-o",
            str(tmp_path / "diffusers"))
    assert r.exit_code == 0, r.stderr
    pipe = FluxPipeline.from_pretrained(flux["base"], local_files_only=True)
    inputs = _transformer_inputs(pipe, True)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(str(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"))
        got, want = pipe.transformer(**inputs)[0], trained(**inputs)[0]
    assert (want - base).abs().max() > 1e-4  # training moved it
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()

    kohya = tmp_path / "flux.safetensors"
    r = cli("export", str(run_dir), "--format", "kohya", "--dtype", "fp32", "-o", str(kohya))
    assert r.exit_code == 0, r.stderr
    tensors = load_file(str(kohya))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in tensors
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in tensors
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert "modelspec.prediction_type" not in meta  # no epsilon/v for a flow-matching model
    blocks = {"double_blocks": 1, "single_blocks": 1}
    native = _native_base(pipe.transformer, FLUX_COMFY, blocks)  # pipe's base layers
    merged = _comfy_merge(native, tensors)
    reference = dict(trained.named_modules())
    for name, parts in FLUX_COMFY.items():
        for i in range(1):
            row = 0
            for part in (p.format(i=i) for p in parts):
                layer = reference[part]
                w = layer.base_layer.weight + layer.get_delta_weight("default") \
                    if hasattr(layer, "lora_A") else layer.weight
                got = merged[name.format(i=i) + ".weight"][row:row + w.shape[0]]
                assert torch.allclose(got, w.detach(), atol=1e-6), part
                row += w.shape[0]


def test_sd35_trains_its_clip_encoders_and_exports_for_diffusers(tmp_path, tmp_path_factory,
                                                                 cli):
    import torch
    from diffusers import StableDiffusion3Pipeline

    base = tiny_dit_folder(tmp_path_factory, "sd3")
    data = make_dataset(tmp_path / "data", n=3)
    fam = families.get("sd35-medium")
    path = write_profile(tmp_path / "sd3.toml", base, data, tmp_path / "out",
                         lora={"targets": list(fam.unet_targets), "train_text_encoder": True,
                               "rank": 4, "alpha": 8},
                         train={"max_steps": 2, "save_steps": 2, "learning_rate": 1e-2},
                         sample={"prompts": ["a red square"], "every_steps": 2, "steps": 2})
    r = cli("train", "--config", str(path))
    assert r.exit_code == 0, r.stderr
    from PIL import Image

    sample = Image.open(tmp_path / "out" / "samples" / "step-000002-00.png")
    assert sample.size == (64, 64) and len(set(sample.getdata())) > 1  # StableDiffusion3Pipeline
    ckpt = runs.latest(tmp_path / "out").path
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == \
        ["text_encoder", "text_encoder_2", "transformer"]  # never T5
    r = cli("export", str(tmp_path / "out"), "--format", "diffusers", "--dtype", "fp32")
    assert r.exit_code == 0, r.stderr
    exported = r.stdout.strip().splitlines()[0]
    pipe = StableDiffusion3Pipeline.from_pretrained(base, local_files_only=True)
    ids = pipe.tokenizer(["a red square"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder_2(ids)[0]
        pipe.load_lora_weights(exported)
        after = pipe.text_encoder_2(ids)[0]
    assert (after - before).abs().max() > 1e-5  # the trained encoder LoRA is applied


def test_flux_schnell_trains_on_aspect_buckets(tmp_path, tmp_path_factory, cli):
    from PIL import Image

    base = tiny_dit_folder(tmp_path_factory, "flux-schnell")
    data = make_dataset(tmp_path / "data", n=2)
    for i, size in enumerate([(96, 48), (48, 96)]):  # wide and tall: two buckets
        Image.new("RGB", size, (200, 30, 30)).save(data / f"wide{i}.png")
        (data / f"wide{i}.txt").write_text("sks, red", "utf-8")
    path = write_profile(tmp_path / "s.toml", base, data, tmp_path / "out",
                         data={"bucketing": True, "bucket_step": 8},
                         lora={"targets": list(families.get("flux-schnell").unet_targets)},
                         train={"max_steps": 3, "save_steps": 3, "batch_size": 1})
    r = cli("train", "--config", str(path))
    assert r.exit_code == 0, r.stderr
    assert "not a multiple of 16 px" in r.stderr  # raised to what 8x VAE + 2x2 packing need
    buckets = json.loads((tmp_path / "out" / "dataset.json").read_text())["buckets"]["buckets"]
    sizes = sorted(tuple(b["resolution"]) for b in buckets.values())
    assert sizes == [(32, 80), (64, 64), (80, 32)]  # sides in multiples of 16 px
    assert runs.latest(tmp_path / "out").step == 3
