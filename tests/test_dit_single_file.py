"""Single-file FLUX.1 checkpoints (`model.base = some.safetensors` in Black Forest Labs' layout).

lora loads them through diffusers' single-file converter, which splits the fused tensors at
FLUX.1's real width (3072): the tiny model written in that layout cannot load, and `lora train`
says so before a run folder is written, with the way out.
"""

from __future__ import annotations

import pytest

from dit_fixtures import tiny_dit_folder

from loracli import convert_dit
from loracli.convert import ConversionError
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
