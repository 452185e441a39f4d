"""Oracle: the first optimizer step of `lora train`, recomputed by a plain diffusers + peft
reference written here (tests/oracle_reference.py), for the options that change the step.

How the comparison is made exact:
- the base has a one-timestep scheduler (t = 0, alpha_bar = 0.9) and LoRA dropout is 0, so the only
  random draw left is the noise, which the reference reads back from the noisy latents the trainer
  gave the UNet (noise = (x_t - sqrt(a) x0) / sqrt(1 - a), x0 from the reference's own VAE);
- weight decay 0 and no clipping: after one AdamW step each LoRA B is exactly
  -lr * g / (|g| + eps), computed here with torch.optim.AdamW from the reference's gradient g;
- LoRA alpha is tiny, so most |g| are below AdamW's eps (median 0.03-0.3 eps here) and the step
  follows the gradient's size: a gradient twice too large (or weighted wrongly) gives a visibly
  different B, which the usual AdamW step (about -lr * sign(g)) would hide. Each test checks
  that this sensitivity holds.
The A matrices are random in the trainer; the reference takes them from the step-1 checkpoint
(they do not move in step 1: their gradient is 0 while B = 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from oracle_reference import (ADAM_EPS, Reference, UnetCalls, adamw_first_step, adapter,
                              metrics, one_timestep_base, two_colour_image, with_lora)
from train_fixtures import write_profile

pytestmark = pytest.mark.slow

RANK, ALPHA, LR = 4, 1e-4, 1e-3
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
IMAGES = {"a": ((255, 0, 0), (0, 0, 255), "sks, red left, blue right"),
          "b": ((0, 255, 0), (255, 255, 255), "sks, green left, white right")}


@pytest.fixture(scope="module")
def base(tiny_sd, tmp_path_factory) -> Path:
    return one_timestep_base(tiny_sd, tmp_path_factory.mktemp("oracle-step") / "sd1-t1")


@pytest.fixture(scope="module")
def reference(base) -> Reference:
    return Reference(base)


def _dataset(folder: Path) -> dict:
    folder.mkdir(parents=True)
    for name, (left, right, caption) in IMAGES.items():
        two_colour_image(folder / f"{name}.png", left, right)
        (folder / f"{name}.txt").write_text(caption, "utf-8")
    return {name: Image.open(folder / f"{name}.png").convert("RGB") for name in IMAGES}


def _train(cli, monkeypatch, tmp_path, base, train=None, lora=None):
    images = _dataset(tmp_path / "data")
    profile = write_profile(
        tmp_path / "oracle.toml", base, tmp_path / "data", tmp_path / "out",
        lora={"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": list(TARGETS),
              **(lora or {})},
        train={"max_steps": 1, "save_steps": 1, "batch_size": 2, "learning_rate": LR,
               "weight_decay": 0.0, "max_grad_norm": 0.0, "scheduler": "constant",
               "warmup_steps": 0, "seed": 7, **(train or {})})
    spy = UnetCalls()
    with spy.active(monkeypatch):
        result = cli("train", "--config", profile, "--json")
    assert result.exit_code == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["status"] == "finished" and done["step"] == 1
    return Path(done["run"]), Path(done["checkpoint"]), images, spy.elements()


def _reference_step(reference, checkpoint, images, elements, batch, accum, gamma=0.0,
                    te_lr=None):
    """The loss and the LoRA B matrices after step 1, by the reference; and the gradients."""
    candidates = {name: reference.latent(im) for name, im in images.items()}
    unet = reference.unet()
    groups = [(with_lora(unet, checkpoint, "unet", RANK, ALPHA, TARGETS), LR)]
    text_encoder = None
    if te_lr is not None:
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(reference.base, subfolder="text_encoder")
        groups.append((with_lora(text_encoder, checkpoint, "text_encoder", RANK, ALPHA,
                                 TE_TARGETS), te_lr))
    assert len(elements) == batch * accum, "one UNet input per image of the step"
    losses = []
    for micro in range(accum):
        chunk = elements[micro * batch:(micro + 1) * batch]
        names = [reference.identify(e, candidates) for e in chunk]
        x_t = torch.stack([e["sample"] for e in chunk])
        t = torch.tensor([e["timestep"] for e in chunk])
        target = torch.stack([reference.noise(e, candidates[n]) for e, n in zip(chunk, names)])
        captions = [IMAGES[n][2] for n in names]
        if text_encoder is not None:
            text = text_encoder(torch.cat([reference.ids(c) for c in captions]))[0]
        else:
            text = torch.stack([reference.text(c) for c in captions])
        pred = unet(x_t, t, encoder_hidden_states=text).sample
        per = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if gamma:
            a = reference.alpha_bar[t]
            snr = a / (1 - a)
            per = per * torch.clamp(snr, max=gamma) / snr  # min-SNR-gamma, epsilon objective
        loss = per.mean()
        (loss / accum).backward()
        losses.append(loss.item())
    grads = [{n: p.grad.detach().clone() for n, p in params.items()} for params, _ in groups]
    return sum(losses) / len(losses), adamw_first_step(groups), grads


def _assert_same_b(checkpoint, expected: dict, component: str):
    saved = {k: v for k, v in adapter(checkpoint, component).items() if ".lora_B." in k}
    assert sorted(saved) == sorted(expected), f"{component}: not the reference's LoRA layers"
    scale = max(float(expected[k].abs().max()) for k in saved)
    worst = max(float((saved[k] - expected[k]).abs().max()) for k in saved)
    assert scale > 0, "the reference step moved nothing"
    assert worst <= 1e-3 * scale, f"{component}: LoRA B after step 1 is off by {worst:.3g} " \
                                  f"(update size {scale:.3g})"


def _first_step(grads: dict, lr: float, factor: float = 1.0) -> dict:
    """AdamW's first step for gradient factor * g (eps 1e-8, no decay), written out."""
    return {k: -lr * factor * g / (factor * g.abs() + ADAM_EPS) for k, g in grads.items()}


def _noticeably_different(a: dict, b: dict) -> bool:
    """Two candidate updates differ by 50x the tolerance of `_assert_same_b`."""
    scale = max(float(v.abs().max()) for v in a.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) > 50 * 1e-3 * scale


def test_gradient_accumulation_averages_micro_batches(cli, monkeypatch, tmp_path, base,
                                                      reference):
    run, ckpt, images, elements = _train(cli, monkeypatch, tmp_path, base,
                                         train={"batch_size": 1, "gradient_accumulation": 2})
    loss, expected, grads = _reference_step(reference, ckpt, images, elements, batch=1, accum=2)
    assert metrics(run)[0]["loss"] == pytest.approx(loss, rel=1e-4)
    # the comparison notices a gradient summed over the micro-batches instead of averaged
    assert _noticeably_different(_first_step(grads[0], LR), _first_step(grads[0], LR, 2.0))
    _assert_same_b(ckpt, expected[0], "unet")


def test_min_snr_gamma_weights_the_loss(cli, monkeypatch, tmp_path, base, reference):
    gamma = 1.0  # SNR is 9 at the one timestep: the weight is min(9, 1) / 9
    run, ckpt, images, elements = _train(cli, monkeypatch, tmp_path, base,
                                         train={"min_snr_gamma": gamma})
    loss, expected, grads = _reference_step(reference, ckpt, images, elements, batch=2, accum=1,
                                            gamma=gamma)
    assert metrics(run)[0]["loss"] == pytest.approx(loss, rel=1e-4)
    # the comparison notices an unweighted (x9) or inverted (x81) loss
    assert _noticeably_different(_first_step(grads[0], LR), _first_step(grads[0], LR, 9.0))
    _assert_same_b(ckpt, expected[0], "unet")


def test_text_encoder_lr_is_the_text_encoder_step_size(cli, monkeypatch, tmp_path, base,
                                                       reference):
    te_lr = LR / 10
    run, ckpt, images, elements = _train(
        cli, monkeypatch, tmp_path, base, lora={"train_text_encoder": True,
                                                "text_encoder_targets": list(TE_TARGETS)},
        train={"text_encoder_lr": te_lr})
    loss, expected, grads = _reference_step(reference, ckpt, images, elements, batch=2, accum=1,
                                            te_lr=te_lr)
    assert metrics(run)[0]["loss"] == pytest.approx(loss, rel=1e-4)
    _assert_same_b(ckpt, expected[0], "unet")
    _assert_same_b(ckpt, expected[1], "text_encoder")
    # the comparison notices the text encoder stepping with learning_rate instead
    assert _noticeably_different(_first_step(grads[1], te_lr), _first_step(grads[1], LR))
