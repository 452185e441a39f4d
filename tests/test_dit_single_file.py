"""Single-file FLUX.1 checkpoints (`model.base = some.safetensors` in Black Forest Labs' layout).

lora loads them through diffusers' single-file converter, which splits the fused tensors at
FLUX.1's real width (3072): the tiny model written in that layout cannot load, and `lora train`
says so before a run folder is written, with the way out.
"""

from __future__ import annotations

import pytest

from dit_fixtures import tiny_dit_folder

from loracli.exporting import convert_dit
from loracli.exporting.convert import ConversionError
from train_fixtures import make_dataset, write_profile

pytestmark = pytest.mark.slow


def bfl_file(folder, dest):
    """The tiny transformer's weights under BFL's names (q/k/v fused), with ComfyUI's prefix."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    state = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict()
    fused: dict[str, list] = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        try:
            native, parts, i = convert_dit.native_name(module, "flux")
        except ConversionError:
            continue  # norms and the swapped modulations: not needed to recognise the file
        fused.setdefault(f"{native}.{leaf}", [None] * len(parts))[i] = tensor
    save_file({"model.diffusion_model." + k: torch.cat(v).contiguous() for k, v in fused.items()},
              str(dest))
    return dest


def test_a_flux_single_file_diffusers_cannot_split_is_refused_before_the_run(tmp_path,
                                                                             tmp_path_factory,
                                                                             cli):
    from safetensors import safe_open

    base = bfl_file(tiny_dit_folder(tmp_path_factory, "flux-dev"), tmp_path / "flux1-tiny.safetensors")
    with safe_open(str(base), "pt") as f:
        assert f.get_slice("model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
                           ).get_shape() == [96, 32]
    out = tmp_path / "out"
    path = write_profile(tmp_path / "p.toml", base, make_dataset(tmp_path / "data", n=2), out)
    r = cli("train", "--config", str(path))
    assert r.exit_code != 0
    assert "error:" in r.stderr and "32 wide" in r.stderr and "3072" in r.stderr
    assert "hint:" in r.stderr and "diffusers folder" in r.stderr
    assert "internal" not in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


_SAI_NORMS = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q",
              "attn.norm_added_k": "context_block.attn.ln_k",
              "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}


def _swap(t):  # SAI's adaLN (shift, scale) ↔ diffusers' (scale, shift)
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], 0)


def sai_file(folder, dest):
    """The tiny SD3.5 transformer in SAI's MMDiT layout (what sd3.5_medium.safetensors holds),
    the inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    last = json.loads((folder / "transformer" / "config.json").read_text())["num_layers"] - 1
    fused, out = {}, {}
    for key, t in state.items():
        module, _, leaf = key.rpartition(".")
        block, _, rest = module.removeprefix("transformer_blocks.").partition(".")
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = t
        elif module == "norm_out.linear":
            out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap(t)
        elif module == f"transformer_blocks.{last}.norm1_context.linear":
            out[f"joint_blocks.{last}.context_block.adaLN_modulation.1.{leaf}"] = _swap(t)
        elif module.startswith("transformer_blocks.") and rest in _SAI_NORMS:
            out[f"joint_blocks.{block}.{_SAI_NORMS[rest]}.{leaf}"] = t
        else:
            native, parts, i = convert_dit.native_name(module, "mmdit")
            fused.setdefault(f"{native}.{leaf}", [None] * len(parts))[i] = t
    out.update({k: torch.cat(v) for k, v in fused.items()})
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in out.items()}, str(dest))
    return dest


def _cache(alias, folder):
    """`folder` as the model cache's snapshot of `alias` (what `lora fetch` leaves)."""
    import shutil

    from loracli.hub import hubcache, models

    ref = models.resolve(alias)
    repo = hubcache.repo_folder(ref.repo_id)
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / (ref.revision or "main")).write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_an_sd35_single_file_trains_as_its_diffusers_folder(tmp_path, tmp_path_factory, cli,
                                                            isolated):
    """The transformer from SAI's single file, the VAE and encoders from the cached model: one
    step gives the adapter one step from the diffusers folder gives."""
    import torch

    from loracli import families
    from loracli.training import runs
    from train_fixtures import adapter_tensors

    folder = tiny_dit_folder(tmp_path_factory, "sd3")
    _cache("sd35-medium", folder)
    single = sai_file(folder, tmp_path / "sd3.5_medium.safetensors")
    data = make_dataset(tmp_path / "data", n=2)
    got = {}
    for name, base in (("folder", folder), ("file", single)):
        path = write_profile(tmp_path / f"{name}.toml", base, data, tmp_path / name,
                             lora={"targets": list(families.get("sd35-medium").unet_targets)},
                             train={"max_steps": 1, "save_steps": 1, "learning_rate": 1e-2})
        r = cli("train", "--config", str(path))
        assert r.exit_code == 0, r.stderr
        got[name] = adapter_tensors(runs.latest(tmp_path / name).path)
    run = (tmp_path / "file" / "run.json").read_text()
    assert '"family": "sd35-medium"' in run and "sd3.5_medium.safetensors" in run
    assert got["file"].keys() == got["folder"].keys()
    for key, t in got["folder"].items():
        assert torch.allclose(got["file"][key], t, atol=1e-6), key
    # --format merged from the single-file run: a whole folder diffusers loads, equal to the
    # merge of the folder run
    from diffusers import StableDiffusion3Pipeline

    merged = {}
    for name in ("folder", "file"):
        r = cli("export", str(tmp_path / name), "--format", "merged", "--dtype", "fp32", "-o",
                str(tmp_path / f"{name}-merged"))
        assert r.exit_code == 0, r.stderr
        pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / f"{name}-merged",
                                                        local_files_only=True)
        merged[name] = pipe.transformer.state_dict()
    assert merged["file"].keys() == merged["folder"].keys()
    for key, t in merged["folder"].items():
        assert torch.allclose(merged["file"][key], t, atol=1e-6), key
