"""The model family is the one seam: the registry, latent geometry from the VAE config, a toy
family registered here only, a 2x/16-channel VAE end to end, and clear errors for bad bases."""

from __future__ import annotations

import ast
import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest
from train_fixtures import make_dataset, write_profile

from loracli import families, profiles
from loracli.errors import LoraError
from loracli.exporting import convert
from loracli.families import loading, sd

LORACLI = Path(__file__).resolve().parents[1] / "loracli"


# ---------------------------------------------------------------- tier 1: no weights


def _configs_folder(root: Path, *, xl=False, v2=False, latent_channels=4, vae_blocks=4) -> Path:
    """A diffusers folder with real-looking configs and one-tensor safetensors weights: enough
    for detection and `resolve_base`, which read configs and headers, never the weights."""
    import numpy as np
    from safetensors.numpy import save_file

    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    if xl:
        index |= {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    configs = {
        "unet": {"in_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
                 "use_linear_projection": v2,
                 **({"addition_embed_type": "text_time"} if xl else {})},
        "vae": {"latent_channels": latent_channels, "block_out_channels": [128] * vae_blocks,
                "scaling_factor": 0.18215},
        "text_encoder": {"hidden_act": "gelu" if v2 else "quick_gelu"},
    }
    if xl:
        configs["text_encoder_2"] = {"hidden_act": "gelu"}
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(index))
    for name in index:
        if name.startswith("_"):
            continue
        (root / name).mkdir()
        if name in configs:
            (root / name / "config.json").write_text(json.dumps(configs[name]))
            save_file({"w": np.zeros(1, np.float32)}, str(root / name / "model.safetensors"))
        elif name == "scheduler":
            (root / name / "scheduler_config.json").write_text(
                json.dumps({"prediction_type": "v_prediction" if v2 else "epsilon"}))
        else:
            (root / name / "vocab.json").write_text("{}")
    return root


@pytest.mark.parametrize("kind, expected", [({}, "sd1"), ({"v2": True}, "sd2"),
                                            ({"xl": True}, "sdxl")])
def test_detect_reads_the_family_from_configs(tmp_path, kind, expected):
    folder = _configs_folder(tmp_path / "m", **kind)
    assert families.detect(folder) == expected
    base = loading.resolve_base(str(folder))
    assert base.family == expected and base.config_dir == folder.resolve()
    assert base.prediction_type == ("v_prediction" if expected == "sd2" else "epsilon")


@pytest.mark.parametrize("vae, unet, shape, multiple", [
    ({"latent_channels": 4, "block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.18215},
     {"in_channels": 4, "block_out_channels": [320, 640, 1280, 1280]}, (4, 64, 96), 64),
    ({"latent_channels": 16, "block_out_channels": [8, 8], "scaling_factor": 2.0,
      "shift_factor": 0.5}, {"in_channels": 16, "block_out_channels": [32, 64]}, (16, 256, 384), 4),
])
def test_geometry_comes_from_the_vae_config(vae, unet, shape, multiple):
    import torch

    g = families.get("sd1").geometry(vae, unet, "m")
    assert g.latent_shape(512, 768) == shape and g.pixel_multiple == multiple
    assert g.to_model(torch.tensor([1.5])).item() == pytest.approx(
        (1.5 - vae.get("shift_factor", 0.0)) * vae["scaling_factor"])


def test_a_scheduler_predicting_something_else_is_refused(tmp_path):
    folder = _configs_folder(tmp_path / "m")
    (folder / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "sample"}')
    with pytest.raises(LoraError, match="predicts 'sample'") as e:
        loading.resolve_base(str(folder))
    assert e.value.hint == "set model.prediction_type to epsilon or v_prediction"
    assert loading.resolve_base(str(folder), prediction="epsilon").prediction_type == "epsilon"


def test_a_vae_whose_latents_do_not_fit_the_unet_is_refused():
    with pytest.raises(LoraError, match="16-channel latents but the denoiser takes 4") as e:
        families.get("sd1").geometry({"latent_channels": 16, "block_out_channels": [1, 1]},
                                     {"in_channels": 4}, "model.vae x")
    assert "model.vae" in e.value.hint


def test_bucket_sides_are_raised_to_what_the_vae_and_unet_divide_by():
    from types import SimpleNamespace

    from loracli.training.denoiser import Model

    g = families.get("sd1").geometry({"latent_channels": 4, "block_out_channels": [1] * 4},
                                     {"block_out_channels": [1] * 4}, "m")  # 8x VAE, 8x UNet
    warnings = []
    model = SimpleNamespace(geometry=g)
    assert Model.bucket_step(model, 128, warnings.append) == 128 and warnings == []
    assert Model.bucket_step(model, 48, warnings.append) == 192
    assert warnings == ["data.bucket_step = 48 is not a multiple of 64 px (the VAE downsamples "
                        "8x, the UNet 8x more); using 192"]


def test_profile_family_values_come_from_the_registry():
    toy = dataclasses.replace(sd.SD1, name="toy-reg")
    with pytest.raises(profiles.ProfileError, match="1 problem") as e:
        profiles.parse({"model": {"family": "toy-reg"}})
    assert "'toy-reg' is not one of auto, sd1, sd2, sdxl" in e.value.problems[0]
    families.register(toy)
    try:
        assert profiles.parse({"model": {"family": "toy-reg"}}).model.family == "toy-reg"
        assert families.get("toy-reg") is toy
    finally:
        families.unregister("toy-reg")
    with pytest.raises(LoraError, match="unknown model family 'toy-reg'"):
        families.get("toy-reg")


def test_export_tables_are_read_from_the_family():
    toy = dataclasses.replace(sd.SDXL, name="toy-xl", kohya_prefixes={"unet": "lora_x"},
                              kohya_unet_layout="diffusers")
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert convert.kohya_stem("unet", path, toy) == "lora_x_" + path.replace(".", "_")
    with pytest.raises(convert.ConversionError, match="no kohya prefix for family 'toy-xl'"):
        convert.kohya_stem("text_encoder", "encoder.layers.0.self_attn.q_proj", toy)


def _family_name_tests(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines comparing something with a family name (`== "sdxl"`, `in ("sd1", "sd2")`)."""
    def constants(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return {c.value for c in node.elts if isinstance(c, ast.Constant)}
        return set()

    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
            and any(constants(n) & names for n in [node.left, *node.comparators])]


def test_no_module_outside_the_families_tests_a_family_name():
    names = set(families.names())
    found = {}
    for path in sorted(LORACLI.rglob("*.py")):
        if "families" in path.relative_to(LORACLI).parts:
            continue
        lines = _family_name_tests(ast.parse(path.read_text("utf-8")), names)
        if lines:
            found[str(path.relative_to(LORACLI))] = lines
    assert found == {}
    # and the check can fail
    assert _family_name_tests(ast.parse('if family == "sdxl": pass'), names) == [1]


# ---------------------------------------------------------------- issue 15: bad base models


def _bad_bases(tmp_path: Path) -> dict:
    """name → (profile `model` table, a word the error must contain)."""
    import numpy as np
    from safetensors.numpy import save_file

    good = _configs_folder(tmp_path / "good")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 40)
    whole = tmp_path / "whole.safetensors"
    save_file({"model.diffusion_model.x": np.ones((64, 64), np.float32)}, str(whole))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    novae = _configs_folder(tmp_path / "novae")
    shutil.rmtree(novae / "vae")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps(_Marker(tmp_path / "unpickled")))
    broken_vae = tmp_path / "broken-vae"
    shutil.copytree(good / "vae", broken_vae)
    (broken_vae / "config.json").write_text('{"latent_channels": 4, "block_out')
    wide_vae = _configs_folder(tmp_path / "wide", latent_channels=16) / "vae"
    lora = tmp_path / "a-lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": np.ones((1, 1), np.float32)}, str(lora))
    no_config = _configs_folder(tmp_path / "noconfig")
    (no_config / "unet" / "config.json").unlink()
    cut_unet = _configs_folder(tmp_path / "cut")
    weights = cut_unet / "unet" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-2])
    return {
        "garbage safetensors": ({"base": str(garbage)}, "not a readable .safetensors"),
        "truncated safetensors": ({"base": str(truncated)}, "not a readable .safetensors"),
        "a LoRA as the base": ({"base": str(lora)}, "its tensors are a LoRA"),
        "folder without vae": ({"base": str(novae)}, "has no vae/ folder"),
        "cut-short unet weights": ({"base": str(cut_unet)}, "not a readable .safetensors"),
        "unet without its config": ({"base": str(no_config)}, "unet has no config.json"),
        "ckpt base": ({"base": str(ckpt)}, "pickled checkpoint"),
        "ckpt vae": ({"base": str(good), "vae": str(ckpt)}, "pickled checkpoint"),
        "garbage vae": ({"base": str(good), "vae": str(garbage)}, "not a readable .safetensors"),
        "vae with a broken config": ({"base": str(good), "vae": str(broken_vae)},
                                     "not valid JSON"),
        "vae that does not fit": ({"base": str(good), "vae": str(wide_vae)},
                                  "16-channel latents"),
    }


class _Marker:
    """A pickle that would create a file when unpickled: lora must never unpickle it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path(self.path).touch, ())


CASES = ["garbage safetensors", "truncated safetensors", "a LoRA as the base",
         "folder without vae", "cut-short unet weights", "unet without its config", "ckpt base", "ckpt vae", "garbage vae",
         "vae with a broken config", "vae that does not fit"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_base_model_is_an_error_with_a_hint_before_the_run_starts(cli, tmp_path, case):
    model, words = _bad_bases(tmp_path)[case]
    data = make_dataset(tmp_path / "data", n=1)
    path = write_profile(tmp_path / "p.toml", model["base"], data, tmp_path / "out",
                         model=model)
    result = cli("train", "--config", path)
    assert result.exit_code == 1, result.stderr
    assert "internal error" not in result.stderr
    assert result.stderr.startswith("error: ") and words in result.stderr, result.stderr
    assert "\nhint: " in result.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not (tmp_path / "unpickled").exists()
    if "ckpt" in case:
        assert ".safetensors" in result.stderr.split("hint: ")[1]


# ---------------------------------------------------------------- tier 2: train, export, load


@pytest.fixture(scope="module")
def tiny_2x(tmp_path_factory) -> Path:
    """A valid diffusers SD pipeline whose VAE downsamples 2x into 16-channel latents."""
    from loracli import tiny

    return tiny.build_tiny_sd(tmp_path_factory.mktemp("x2") / "sd-2x", "sd1", vae_downsample=2,
                              latent_channels=16)


def _unet_inputs(unet, seed: int = 1) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    return {"sample": torch.randn(1, c, s, s, generator=g), "timestep": torch.tensor(500),
            "encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim,
                                                 generator=g)}


@pytest.mark.slow
def test_a_2x_16_channel_vae_pipeline_trains_exports_and_loads_in_diffusers(cli, tiny_2x,
                                                                            tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from export_fixtures import reference_models
    from safetensors.torch import load_file

    from loracli.training import runs

    data = make_dataset(tmp_path / "data", n=2)
    path = write_profile(tmp_path / "x2.toml", tiny_2x, data, tmp_path / "out",
                         train={"max_steps": 3, "save_steps": 3, "learning_rate": 1e-2})
    trained = cli("train", "--config", path, "--json")
    assert trained.exit_code == 0, trained.stderr
    assert json.loads(trained.stdout)["status"] == "finished"
    latents = [load_file(str(f))["latent"] for f in (tmp_path / "out" / "cache" / "latents")
               .glob("*.safetensors")]
    assert latents and {tuple(t.shape) for t in latents} == {(16, 32, 32)}  # 64 px / 2

    out = tmp_path / "x2.safetensors"
    exported = cli("export", tmp_path / "out", "--dtype", "fp32", "-o", out)
    assert exported.exit_code == 0, exported.stderr
    assert all(k.startswith("lora_unet_") for k in load_file(str(out)))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_2x, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    x = _unet_inputs(pipe.unet)
    with torch.no_grad():
        base = pipe.unet(**x).sample
        want = reference_models(tmp_path / "out")["unet"](**x).sample
        pipe.load_lora_weights(str(out), adapter_name="x2")
        got = pipe.unet(**x).sample
        pipe.set_adapters(["x2"], adapter_weights=[0.0])
        off = pipe.unet(**x).sample
    effect = (want - base).abs().max().item()
    assert effect > 1e-3, effect                                  # the LoRA changes the UNet
    assert (got - want).abs().max().item() <= 1e-4 * effect       # … as it was trained
    assert torch.equal(off, base) or (off - base).abs().max().item() <= 1e-6  # weight 0: base
    image = pipe("sks, red square", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)  # the pipeline's own 2x VAE geometry
    assert runs.info(tmp_path / "out")["base"]["family"] == "sd1"


def _toy_base(tiny_sd: Path, dest: Path) -> Path:
    """tiny-sd with its text encoder and tokenizer folders renamed (clip/, clip_tokenizer/)."""
    shutil.copytree(tiny_sd, dest)
    index = json.loads((dest / "model_index.json").read_text())
    for old, new in (("text_encoder", "clip"), ("tokenizer", "clip_tokenizer")):
        (dest / old).rename(dest / new)
        index[new] = index.pop(old)
    (dest / "model_index.json").write_text(json.dumps(index))
    return dest


TOY = dataclasses.replace(
    sd.SD1, name="toy", text_encoders=("clip",), tokenizers=("clip_tokenizer",),
    recognizes=lambda c: "clip" in c.index, recognizes_checkpoint=lambda keys: False,
    kohya_prefixes={"unet": "lora_toynet", "clip": "lora_toyclip"}, base_version="toy_v1",
    modelspec_prefix="toy-diffusion", modelspec_architectures={"epsilon": "toy-diffusion-v1"},
    context_width=None)


@pytest.fixture
def toy_family():
    families.register(TOY)
    yield TOY
    families.unregister(TOY.name)


@pytest.mark.slow
def test_a_toy_family_registered_here_trains_and_exports(cli, tiny_sd, tmp_path, toy_family):
    from safetensors import safe_open

    from loracli.training import runs

    base = _toy_base(tiny_sd, tmp_path / "toy-base")
    assert families.detect(base) == "toy"
    data = make_dataset(tmp_path / "data", n=2)
    path = write_profile(tmp_path / "toy.toml", base, data, tmp_path / "out",
                         lora={"train_text_encoder": True},
                         train={"max_steps": 2, "save_steps": 2, "learning_rate": 1e-2})
    trained = cli("train", "--config", path)
    assert trained.exit_code == 0, trained.stderr
    info = runs.info(tmp_path / "out")
    assert info["base"]["family"] == "toy" and info["components"] == ["unet", "clip"]
    ckpt = runs.latest(tmp_path / "out").path
    assert (ckpt / "clip" / "adapter_model.safetensors").is_file()

    out = tmp_path / "toy.safetensors"
    exported = cli("export", tmp_path / "out", "-o", out)
    assert exported.exit_code == 0, exported.stderr
    with safe_open(str(out), "pt") as f:
        keys, header = list(f.keys()), f.metadata()
    stems = {k.split(".")[0] for k in keys}
    assert stems and all(s.startswith(("lora_toynet_", "lora_toyclip_")) for s in stems)
    assert any(s.startswith("lora_toyclip_text_model_encoder_layers_") for s in stems)
    assert header["ss_base_model_version"] == "toy_v1"
    assert header["modelspec.architecture"] == "toy-diffusion-v1/lora"
    inspected = cli("inspect", out, "--json")
    assert json.loads(inspected.stdout)["base_model_version"] == "toy_v1"
