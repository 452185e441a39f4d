"""The memory options for FLUX.1/SD3.5: a quantized base (`model.quantize`) and gradient
checkpointing of the transformer, through the real commands on the tiny pipelines.

References are built in the test with plain diffusers and peft: the full-precision base
transformer from disk with the checkpoint's adapter set into it by peft.
"""

from __future__ import annotations

import json

import pytest

from dit_fixtures import tiny_dit_folder

from loracli import families
from loracli.training import runs
from train_fixtures import adapter_tensors, make_dataset, write_profile

pytestmark = pytest.mark.slow


def _profile(tmp_path, base, kind, out, **sections):
    data = make_dataset(tmp_path / "data", n=2)
    merged = {"lora": {"targets": list(families.get(kind).unet_targets), "rank": 4, "alpha": 8},
              "train": {"max_steps": 2, "save_steps": 2, "batch_size": 1,
                        "learning_rate": 1e-2}}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return write_profile(tmp_path / f"{out.name}.toml", base, data, out, **merged)


def _with_adapter(transformer, ckpt):
    """`transformer` with the checkpoint's transformer adapter, set by peft itself."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = json.loads((ckpt / "transformer" / "adapter_config.json").read_text())
    config = LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__})
    inject_adapter_in_model(config, transformer, adapter_name="default")
    set_peft_model_state_dict(transformer, load_file(str(ckpt / "transformer" /
                                                         "adapter_model.safetensors")),
                              adapter_name="default")
    return transformer.eval()


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory):
    """A FLUX.1-dev run whose base transformer is stored in float8 (model.quantize = "fp8")."""
    import torch

    from loracli import profiles
    from loracli.training import denoiser
    from loracli.training import loop as training

    tmp = tmp_path_factory.mktemp("fp8")
    base = tiny_dit_folder(tmp_path_factory, "flux-dev")
    path = _profile(tmp, base, "flux-dev", tmp / "out", model={"quantize": "fp8"})
    run_dir, _ = runs.start(profiles.load(str(path)))
    stored = []
    real_init = denoiser.Model.__init__

    def spy(self, *args, **kwargs):  # the dtypes the trainer's base transformer holds
        real_init(self, *args, **kwargs)
        stored.append({p.dtype for n, p in self.unet.named_parameters()
                       if n.endswith("base_layer.weight")})
        stored.append({p.dtype for p in self.unet.parameters() if p.requires_grad})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(denoiser.Model, "__init__", spy)
        result = training.run(run_dir)
    assert result.status == "finished" and result.step == 2
    assert stored == [{torch.float8_e4m3fn}, {torch.float32}]  # base fp8, LoRA fp32
    return {"base": base, "run": run_dir}


def test_fp8_base_trains_and_merged_export_folds_into_the_full_precision_base(fp8_run, cli,
                                                                              tmp_path):
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from test_dit_export import _transformer_inputs

    merged_dir = tmp_path / "merged"
    r = cli("export", str(fp8_run["run"]), "--format", "merged", "--dtype", "fp32", "-o",
            str(merged_dir))
    assert r.exit_code == 0, r.stderr
    pipe = FluxPipeline.from_pretrained(merged_dir, local_files_only=True)
    base = FluxTransformer2DModel.from_pretrained(fp8_run["base"], subfolder="transformer")
    q = "transformer_blocks.0.attn.to_q.weight"
    full = base.state_dict()[q].clone()
    trained = _with_adapter(base, runs.latest(fp8_run["run"]).path)
    inputs = _transformer_inputs(pipe, True)
    with torch.no_grad():
        got, want = pipe.transformer(**inputs)[0], trained(**inputs)[0]
        plain = FluxTransformer2DModel.from_pretrained(fp8_run["base"],
                                                       subfolder="transformer")(**inputs)[0]
    assert (want - plain).abs().max() > 1e-4  # training moved it
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # the merged weight is the full-precision base plus the LoRA, not the float8-rounded base
    layer = trained.transformer_blocks[0].attn.to_q
    delta = layer.get_delta_weight("default")
    merged_base = pipe.transformer.state_dict()[q] - delta
    rounded = full.to(torch.float8_e4m3fn).float()
    assert torch.allclose(merged_base, full, atol=1e-6)
    assert (rounded - full).abs().max() > 1e-3 and not torch.allclose(merged_base, rounded,
                                                                      atol=1e-4)


def test_4bit_without_cuda_stops_before_the_run_folder(tmp_path, tmp_path_factory, cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: 4bit is allowed here")
    base = tiny_dit_folder(tmp_path_factory, "flux-dev")
    out = tmp_path / "out"
    path = _profile(tmp_path, base, "flux-dev", out, model={"quantize": "4bit"})
    r = cli("train", "--config", str(path))
    assert r.exit_code != 0
    assert "error:" in r.stderr and "CUDA" in r.stderr and "internal" not in r.stderr
    assert "hint:" in r.stderr and "model.quantize=fp8" in r.stderr
    assert not out.exists()  # nothing written


def test_quantize_is_refused_for_a_unet_family():
    from loracli.training import quantize
    from loracli.errors import LoraError

    with pytest.raises(LoraError) as e:
        quantize.check("fp8", families.get("sdxl"))
    assert "UNet" in str(e.value) and "model.quantize" in e.value.hint


@pytest.mark.parametrize("kind,family", [("flux-dev", "flux-dev"), ("sd3", "sd35-medium")])
def test_gradient_checkpointing_gives_the_same_step(kind, family, tmp_path, tmp_path_factory,
                                                    monkeypatch):
    import torch
    import torch.utils.checkpoint

    from loracli import profiles
    from loracli.training import loop as training

    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    base = tiny_dit_folder(tmp_path_factory, kind)
    got = {}
    for on in (False, True):
        out = tmp_path / f"gc-{on}"
        path = _profile(tmp_path, base, family, out,
                        train={"max_steps": 1, "save_steps": 1, "gradient_checkpointing": on,
                               "batch_size": 2})
        run_dir, _ = runs.start(profiles.load(str(path)))
        before = len(calls)
        assert training.run(run_dir).status == "finished"
        used = len(calls) - before
        assert (used > 0) == on  # the transformer's blocks were recomputed only when asked
        line = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()[-1]
        got[on] = (json.loads(line)["loss"], adapter_tensors(runs.latest(run_dir).path))
    (loss_off, off), (loss_on, on_) = got[False], got[True]
    assert abs(loss_off - loss_on) <= 1e-5
    assert off.keys() == on_.keys() and off
    for key in off:
        assert torch.allclose(off[key], on_[key], atol=1e-5), key
    assert any((t != 0).any() for k, t in off.items() if "lora_B" in k)  # the step moved them
