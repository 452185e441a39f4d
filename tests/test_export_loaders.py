"""The numeric round trip for target sets loaders handle differently, on the tiny models: every
UNet Linear/Conv2d (conv_in, conv_out and the time embedding included) and text-encoder LoRAs on
q_proj/v_proj only, which `lora export` completes with zero-effect k_proj/out_proj modules.
diffusers loads the kohya file with exactly the trained effect, and the file says what each
loader applies."""

from __future__ import annotations

import pytest
from export_fixtures import (encoders, load_component, make_run, outputs, pipeline_outputs,
                             reference_models)

from loracli.exporting import export as exporting

pytestmark = pytest.mark.slow


def _pipe(family, base):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(base, **({} if family == "sdxl" else {"safety_checker": None}))


@pytest.mark.parametrize("family, unet_targets", [("sd1", "all"), ("sdxl", ["to_q", "to_v"])])
def test_partial_text_targets_load_whole_with_the_trained_effect(family, unet_targets, tmp_path,
                                                                 request):
    from safetensors import safe_open
    from safetensors.torch import load_file

    base = request.getfixturevalue({"sd1": "tiny_sd", "sdxl": "tiny_sdxl"}[family])
    run = make_run(tmp_path / "run", base, family, rank=4, alpha=2.0, unet_targets=unet_targets,
                   text_targets=["q_proj", "v_proj"])
    trained = outputs(reference_models(run), family)
    untrained = outputs({c: load_component(base, c).eval() for c in ("unet", *encoders(family))}, family)
    result = exporting.export(run, dtype="fp32")

    layers = sum(load_component(base, c).config.num_hidden_layers for c in encoders(family))
    assert result.zero_modules == 2 * layers
    tensors = load_file(str(result.path))
    zeros = [k for k in tensors if k.endswith(".lora_up.weight") and not tensors[k].any()]
    assert len(zeros) == 2 * layers
    assert all(k.split(".")[0].endswith(("_k_proj", "_out_proj")) for k in zeros)
    with safe_open(str(result.path), "pt") as f:
        assert f.metadata()["loracli.zero_modules"] == str(2 * layers)

    pipe = _pipe(family, base)
    pipe.load_lora_weights(str(result.path))   # raises without the completion
    got = pipeline_outputs(pipe, family)
    for component in trained:
        assert (trained[component] - untrained[component]).abs().max().item() > 1e-3, component
        # fp32 rounding: diffusers adds the update in another order than peft's forward
        assert (got[component] - trained[component]).abs().max().item() <= 1e-5, component

    diffusers = exporting.export(run, format="diffusers", dtype="fp32")  # peft keys: no completion
    pipe = _pipe(family, base)
    pipe.load_lora_weights(str(diffusers.path))
    for component, value in pipeline_outputs(pipe, family).items():
        assert (value - trained[component]).abs().max().item() <= 1e-5, component

    rows = {r["loader"]: r for r in result.compat}
    assert all(r["error"] is None and r["total"] == len({k.split(".")[0] for k in tensors})
               for r in rows.values())
    for loader in ("a1111", "comfyui", "diffusers"):
        assert rows[loader]["ignored"] == [], loader
    top = {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
           "lora_unet_time_embedding_linear_2"} if family != "sdxl" else set()
    assert set(rows["sd-scripts"]["ignored"]) == top
    assert bool(top) == any(w.startswith("kohya sd-scripts ignores 4 ") for w in result.warnings)


def test_cli_prints_the_report_and_json_carries_it(tmp_path, tiny_sd, cli):
    import json

    run = make_run(tmp_path / "run", tiny_sd, "sd1", unet_targets="all")
    human = cli("export", run, "-o", tmp_path / "a.safetensors")
    assert human.exit_code == 0, human.stderr
    import re

    counts = dict(re.findall(r"^  (.+?): (\d+ of \d+) modules applied$", human.stderr, re.M))
    total = int(counts["AUTOMATIC1111"].split(" of ")[1])
    assert counts == {"AUTOMATIC1111": f"{total} of {total}", "ComfyUI/Forge": f"{total} of {total}",
                      "kohya sd-scripts": f"{total - 4} of {total}", "diffusers": f"{total} of {total}"}
    assert "warning: kohya sd-scripts ignores 4 of" in human.stderr
    assert "lora_unet_conv_in" in human.stderr
    doc = json.loads(cli("export", run, "-o", tmp_path / "b.safetensors", "--json").stdout)
    rows = {r["loader"]: r for r in doc["compatibility"]}
    assert rows["sd-scripts"]["applied"] == rows["sd-scripts"]["total"] - 4
    assert rows["a1111"]["applied"] == rows["a1111"]["total"]
