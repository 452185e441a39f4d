"""A "trained" run folder written exactly to the checkpoint contract (loracli/training/runs.py), for export.

The LoRA weights are seeded random values with lora_B nonzero, so the adapter changes the UNet
and text-encoder outputs measurably; `reference_models` rebuilds the trained models with peft
from the checkpoint, the ground truth every export is compared with.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

ADAPTER = "default"
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# fp16 storage rounds lora_down/lora_up to 11 significant bits (unit roundoff 2^-11 ≈ 4.9e-4), so
# max|fp16 export - trained| ≤ k · max|trained - base| with k = 5e-3 (about 10 unit roundoffs).
# Measured k: SD1 5.2e-4 (UNet), 4.9e-4 (text encoder); SDXL 1.1e-3, 2.7e-4, 3.8e-4.
FP16_RELATIVE_BOUND = 5e-3


def encoders(family: str) -> tuple[str, ...]:
    return ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)


def load_component(base: Path, component: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if component == "unet":
        return UNet2DConditionModel.from_pretrained(base / "unet")
    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    return cls.from_pretrained(base / component)


def lora_config(rank, alpha, targets, rslora=False, **extra):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                      use_rslora=rslora, init_lora_weights=True, **extra)


def make_run(run_dir: Path, base: Path, family: str, *, rank: int = 4, alpha: float = 8.0,
             rslora: bool = False, text_encoder: bool = True, step: int = 5, seed: int = 0,
             unet_targets=UNET_TARGETS, trigger: str = "sks style", extra_unet: dict | None = None,
             profile_name: str = "anime", text_targets=TEXT_TARGETS) -> Path:
    """Write run.json, profile.toml, dataset.json and checkpoints/step-NNNNNN/ with COMPLETE."""
    import torch
    from peft import get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    from loracli import atomic, profiles
    from loracli.training import runs

    run_dir = Path(run_dir)
    ckpt = runs.checkpoint_dir(run_dir, step)
    components = ["unet", *(encoders(family) if text_encoder else ())]
    generator = torch.Generator().manual_seed(seed)
    files = {}
    for component in components:
        model = load_component(base, component)
        targets = unet_targets if component == "unet" else text_targets
        if targets == "all":  # every Linear and Conv2d, by full name
            targets = [n for n, m in model.named_modules()
                       if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        config = lora_config(rank, alpha, targets, rslora,
                             **((extra_unet or {}) if component == "unet" else {}))
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
        folder = ckpt / component
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
        cfg = config.to_dict()
        cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
        (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str), "utf-8")
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            files[f"{component}/{f}"] = runs.sha256_file(folder / f)
    (ckpt / "optimizer.pt").write_bytes(b"trainer-private")
    files["optimizer.pt"] = runs.sha256_file(ckpt / "optimizer.pt")
    atomic.write_json(ckpt / "state.json", {"step": step, "epoch": 1, "files": files})
    (ckpt / runs.MARKER).write_text("ok")

    profile = profiles.parse({
        "model": {"base": str(base), "family": family},
        "data": {"dir": str(run_dir / "data"), "resolution": 64, "trigger": trigger},
        "lora": {"rank": rank, "alpha": float(alpha), "rslora": rslora,
                 "train_text_encoder": text_encoder,
                 "targets": ["all"] if unet_targets == "all" else list(unet_targets),
                 "text_encoder_targets": ["all"] if text_targets == "all" else list(text_targets),
                 "dropout": 0.0},
        "train": {"max_steps": step, "learning_rate": 1e-4, "save_steps": step,
                  "output_dir": str(run_dir)},
    }, name=profile_name)
    atomic.write_text(run_dir / "profile.toml", profile.to_toml())
    atomic.write_json(run_dir / "run.json", {
        "lora_version": "0.1.0",
        "started_at": datetime(2026, 11, 28, 1, 2, 3, tzinfo=timezone.utc).isoformat(),
        "profile": profile_name,
        "base": {"model": str(base), "path": str(base), "repo": "loracli/tiny-sd",
                 "commit": "0" * 40, "family": family,
                 "prediction_type": "v_prediction" if family == "sd2" else "epsilon"},
        "components": components,
    })
    atomic.write_json(run_dir / "dataset.json", {
        "num_images": 3, "resolution": 64,
        "tag_frequency": {"10_sks": {"sks style": 3, "red": 2, "lighthouse": 1}},
    })
    return run_dir


def reference_models(run_dir: Path, step: int | None = None) -> dict:
    """The trained models: each base component with the checkpoint's adapter injected by peft."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from loracli.training import runs

    info = runs.info(run_dir)
    ckpt = runs.latest(run_dir, step).path
    base = Path(info["base"]["path"])
    models = {}
    for component in info["components"]:
        model = load_component(base, component)
        config = json.loads((ckpt / component / "adapter_config.json").read_text("utf-8"))
        inject_adapter_in_model(LoraConfig.from_peft_type(**config) if "peft_type" in config
                                else LoraConfig(**config), model, adapter_name=ADAPTER)
        result = set_peft_model_state_dict(model, load_file(ckpt / component / "adapter_model.safetensors"),
                                           adapter_name=ADAPTER)
        assert not result.unexpected_keys
        models[component] = model.eval()
    for component in ("unet", *encoders(info["base"]["family"])):
        models.setdefault(component, load_component(base, component).eval())
    return models


def inputs(family: str, seed: int = 1) -> dict:
    """Fixed UNet and text-encoder inputs for a tiny pipeline of `family`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = 64 if family == "sdxl" else 32
    unet = {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor(500),
            "encoder_hidden_states": torch.randn(1, 77, hidden, generator=g)}
    if family == "sdxl":
        unet["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                     "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    return {"unet": unet, "ids": ids}


def outputs(models: dict, family: str) -> dict:
    """UNet noise prediction and each text encoder's last hidden state, fp32."""
    import torch

    x = inputs(family)
    with torch.no_grad():
        out = {"unet": models["unet"](**x["unet"]).sample.float()}
        for component in encoders(family):
            out[component] = models[component](x["ids"])[0].float()
    return out


def pipeline_outputs(pipe, family: str) -> dict:
    return outputs({"unet": pipe.unet, "text_encoder": pipe.text_encoder,
                    "text_encoder_2": getattr(pipe, "text_encoder_2", None)}, family)
