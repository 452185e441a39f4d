"""Training objectives: what the denoiser sees and what it must predict, and how samples weigh.

An objective turns (clean latents, noise, timesteps) into the denoiser's input and its target,
and gives a per-sample loss weight. SD1/SD2/SDXL use the DDPM forward process with an epsilon
or a velocity target; a flow-matching family (FLUX, SD3) adds an objective here with its own
interpolation and target, and the trainer does not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class Objective(Protocol):
    """What the trainer asks of an objective (tensors in, tensors out; no state)."""

    name: str  # run.json's base.prediction_type for the DDPM ones

    def scheduler(self, config):
        """The training noise schedule, built from the model's own scheduler config."""

    def noisy_input_and_target(self, latents, noise, timesteps, scheduler):
        """(what the denoiser sees, what it must predict) for scaled clean latents."""

    def weights(self, timesteps, scheduler, min_snr_gamma: float):
        """A per-sample loss weight, or None for equal weights."""

    def model_timesteps(self, timesteps, scheduler):
        """The timesteps the denoiser is given for the drawn integer steps."""


def ddpm_scheduler(config):
    """The training noise schedule of a DDPM family: its own scheduler's betas, DDPM noising."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)


def _snr(timesteps, scheduler):
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas / (1 - alphas)


@dataclass(frozen=True)
class Epsilon:
    """DDPM noising; the denoiser predicts the noise."""

    name: str = "epsilon"

    def scheduler(self, config):
        return ddpm_scheduler(config)

    def noisy_input_and_target(self, latents, noise, timesteps, scheduler):
        return scheduler.add_noise(latents, noise, timesteps), noise

    def model_timesteps(self, timesteps, scheduler):
        return timesteps

    def weights(self, timesteps, scheduler, min_snr_gamma: float):
        """min-SNR-γ (Hang et al. 2023): min(SNR, γ) / SNR per sample; None when off."""
        if min_snr_gamma <= 0:
            return None
        snr = _snr(timesteps, scheduler)
        return snr.clamp(max=min_snr_gamma) / snr


@dataclass(frozen=True)
class VPrediction:
    """DDPM noising; the denoiser predicts the velocity √ᾱ·ε − √(1−ᾱ)·x₀ (SD2 768, v-models)."""

    name: str = "v_prediction"

    def scheduler(self, config):
        return ddpm_scheduler(config)

    def noisy_input_and_target(self, latents, noise, timesteps, scheduler):
        return (scheduler.add_noise(latents, noise, timesteps),
                scheduler.get_velocity(latents, noise, timesteps))

    def model_timesteps(self, timesteps, scheduler):
        return timesteps

    def weights(self, timesteps, scheduler, min_snr_gamma: float):
        """min-SNR-γ for a velocity target: min(SNR, γ) / (SNR + 1)."""
        if min_snr_gamma <= 0:
            return None
        snr = _snr(timesteps, scheduler)
        return snr.clamp(max=min_snr_gamma) / (snr + 1)


DDPM_OBJECTIVES = {"epsilon": Epsilon(), "v_prediction": VPrediction()}


@dataclass(frozen=True)
class FlowMatching:
    """Rectified flow (FLUX, SD3): x_σ = (1 − σ)·x₀ + σ·ε; the denoiser predicts ε − x₀.

    σ is drawn as diffusers' `train_dreambooth_lora_flux.py` / `_sd3.py` draw it: u from a density
    (`uniform`, or `logit_normal` = sigmoid of N(mean, std)), then the step `int(u × T)` of the
    model's own FlowMatchEulerDiscreteScheduler (its static `shift` already in its sigmas). The
    trainer hands every objective a uniform integer step t in [0, T); here it becomes u = (t + ½)/T
    and passes through the density's inverse CDF, so each micro-batch draws exactly as before
    (same generator, same resume) and σ follows the anchors' distribution over T bins.
    """

    name: str = "flow_matching"
    density: str = "uniform"      # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def scheduler(self, config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def indices(self, timesteps, scheduler):
        """Uniform integer steps → indices into the scheduler's (descending) sigma table."""
        import torch

        T = len(scheduler.timesteps)
        u = (timesteps.to(torch.float64) + 0.5) / T
        if self.density == "logit_normal":
            normal = math.sqrt(2.0) * torch.special.erfinv(2.0 * u - 1.0)
            u = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        return (u * T).long().clamp(0, T - 1).cpu()

    def sigmas(self, timesteps, scheduler):
        return scheduler.sigmas[self.indices(timesteps, scheduler)].to(timesteps.device)

    def model_timesteps(self, timesteps, scheduler):
        """What the transformer is told: the scheduler's timestep (σ × T) for the drawn step."""
        return scheduler.timesteps[self.indices(timesteps, scheduler)].to(timesteps.device)

    def noisy_input_and_target(self, latents, noise, timesteps, scheduler):
        sigma = self.sigmas(timesteps, scheduler).to(latents.dtype)
        sigma = sigma.view(-1, *([1] * (latents.dim() - 1)))
        return (1.0 - sigma) * latents + sigma * noise, noise - latents

    def weights(self, timesteps, scheduler, min_snr_gamma: float):
        """Equal weights: diffusers' `compute_loss_weighting_for_sd3` is 1 for these densities.
        (min-SNR-γ is a DDPM weighting; flow matching does not use it.)"""
        return None
