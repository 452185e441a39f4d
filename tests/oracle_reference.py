"""An independent reference for the training-option oracles (tests/test_oracle_*.py).

Everything here is plain diffusers + transformers + peft + torch, loaded from the base model's
folder; nothing imports the trainer. The trainer's own random draws (noise, flips, caption
shuffles, batch order) are read back from what it fed the diffusers UNet (`UnetCalls`), and the
reference recomputes from that what the step must have been.

The base model is the tiny SD1 pipeline with its scheduler replaced by a one-timestep DDPM
(beta = 0.1): every draw then has t = 0, alpha_bar = 0.9, SNR = 9, and the noise in a noisy latent
is exactly recoverable: noise = (x_t - sqrt(a) x0) / sqrt(1 - a).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ALPHA_BAR = 0.9  # the one timestep's cumulative alpha (beta_start = beta_end = 0.1)
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which the trainer's profile cannot change


def one_timestep_base(tiny_sd: Path, dest: Path) -> Path:
    """A copy of the tiny SD1 pipeline whose DDPM scheduler has a single timestep."""
    shutil.copytree(tiny_sd, dest)
    path = dest / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text("utf-8"))
    config.update(num_train_timesteps=1, beta_schedule="linear", beta_start=1 - ALPHA_BAR,
                  beta_end=1 - ALPHA_BAR)
    path.write_text(json.dumps(config), "utf-8")
    return dest


def two_colour_image(path: Path, left, right, size: int = 64) -> Path:
    """Left half one colour, right half another: its mirror image is a different picture."""
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[:, : size // 2] = left
    array[:, size // 2:] = right
    Image.fromarray(array).save(path)
    return path


class UnetCalls:
    """Records the inputs of every `UNet2DConditionModel.forward` call while active."""

    def __init__(self):
        self.calls: list[dict] = []

    @contextlib.contextmanager
    def active(self, monkeypatch):
        from diffusers import UNet2DConditionModel

        real = UNet2DConditionModel.forward
        calls = self.calls

        def spy(module, sample, timestep, encoder_hidden_states, *args, **kwargs):
            t = torch.as_tensor(timestep).detach().reshape(-1).cpu()
            calls.append({"sample": sample.detach().float().cpu().clone(),
                          "timestep": t.expand(sample.shape[0]).clone(),
                          "text": encoder_hidden_states.detach().float().cpu().clone()})
            return real(module, sample, timestep, encoder_hidden_states, *args, **kwargs)

        with monkeypatch.context() as mp:
            mp.setattr(UNet2DConditionModel, "forward", spy)
            yield self

    def elements(self) -> list[dict]:
        """One entry per image the UNet saw, in order: noisy latent, timestep, text states."""
        return [{"sample": c["sample"][i], "timestep": int(c["timestep"][i]),
                 "text": c["text"][i]} for c in self.calls for i in range(c["sample"].shape[0])]


class Reference:
    """The base model's parts, loaded by diffusers/transformers themselves."""

    def __init__(self, base: Path):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.base = Path(base)
        self.vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval()
        self.scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        self._unet_class = UNet2DConditionModel
        self.alpha_bar = self.scheduler.alphas_cumprod

    def unet(self):
        return self._unet_class.from_pretrained(self.base, subfolder="unet")

    @torch.no_grad()
    def latent(self, image: Image.Image) -> torch.Tensor:
        """The scaled VAE latent (posterior mean) of a 64 px picture, as SD training uses it."""
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
        mean = self.vae.encode(x.permute(2, 0, 1)[None]).latent_dist.mean[0]
        return mean * self.vae.config.scaling_factor

    def ids(self, caption: str) -> torch.Tensor:
        return self.tokenizer([caption], padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def text(self, caption: str) -> torch.Tensor:
        return self.text_encoder(self.ids(caption))[0][0]

    def noise(self, element: dict, x0: torch.Tensor) -> torch.Tensor:
        """The noise that turns clean latent x0 into the element's noisy latent."""
        a = self.alpha_bar[element["timestep"]]
        return (element["sample"] - a.sqrt() * x0) / (1 - a).sqrt()

    def identify(self, element: dict, candidates: dict) -> str:
        """Which clean latent the noisy one was made from: the one that leaves the least noise.

        Each channel's spatial mean is set aside first (a noise offset shifts exactly that). A
        wrong candidate adds sqrt(a / (1 - a)) * (x0 - x0') to the noise: 3x the latent
        difference here, and two-colour pictures in saturated colours differ by 2 per element.
        """
        def leftover(x0):
            n = self.noise(element, x0)
            return float((n - n.mean(dim=(1, 2), keepdim=True)).pow(2).mean())

        scores = sorted((leftover(x0), name) for name, x0 in candidates.items())
        (best, name), (second, _) = scores[0], scores[1]
        assert best * 3 < second, f"ambiguous image: {scores[:3]}"
        return name

    def caption_of(self, element: dict, captions: dict) -> str:
        """Which caption's text-encoder states the UNet was given."""
        dist = sorted((float((element["text"] - states).abs().max()), c)
                      for c, states in captions.items())
        assert dist[0][0] < 1e-4 < dist[1][0], f"no caption matches: {dist[:2]}"
        return dist[0][1]


def adapter(checkpoint: Path, component: str) -> dict:
    """The peft-format adapter tensors a checkpoint holds for one component."""
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint) / component / "adapter_model.safetensors"))


def with_lora(module, checkpoint: Path, component: str, rank: int, alpha: float, targets):
    """`module` with a peft LoRA whose A matrices are the checkpoint's and B = 0.

    After one AdamW step without weight decay, A is still its initial value (its gradient is
    zero while B = 0), so this is the LoRA exactly as the trainer started its first step.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
    inject_adapter_in_model(config, module, adapter_name="default")
    saved = adapter(checkpoint, component)
    start = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in saved.items()}
    result = set_peft_model_state_dict(module, start, adapter_name="default")
    assert not getattr(result, "unexpected_keys", None), result.unexpected_keys
    module.requires_grad_(False)
    params = {}
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.requires_grad_(True)
            params[name.replace(".default", "")] = p
    assert params and len(params) == sum(".lora_B." in k for k in saved)
    return params


def adamw_first_step(groups: list[tuple[dict, float]]) -> list[dict]:
    """Each group's params after one torch AdamW step (weight decay 0) from their .grad."""
    optimizer = torch.optim.AdamW([{"params": list(p.values()), "lr": lr} for p, lr in groups],
                                  weight_decay=0.0, eps=ADAM_EPS)
    optimizer.step()
    return [{name: p.detach().clone() for name, p in params.items()} for params, _ in groups]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in
            (Path(run_dir) / "logs" / "metrics.jsonl").read_text("utf-8").splitlines() if line]
