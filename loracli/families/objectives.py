"""Training objectives: what the denoiser sees and what it must predict, and how samples weigh.

An objective turns (clean latents, noise, timesteps) into the denoiser's input and its target,
and gives a per-sample loss weight. SD1/SD2/SDXL use the DDPM forward process with an epsilon
or a velocity target; a flow-matching family (FLUX, SD3) adds an objective here with its own
interpolation and target, and the trainer does not change.
"""

from __future__ import annotations

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

    def weights(self, timesteps, scheduler, min_snr_gamma: float):
        """min-SNR-γ for a velocity target: min(SNR, γ) / (SNR + 1)."""
        if min_snr_gamma <= 0:
            return None
        snr = _snr(timesteps, scheduler)
        return snr.clamp(max=min_snr_gamma) / (snr + 1)


DDPM_OBJECTIVES = {"epsilon": Epsilon(), "v_prediction": VPrediction()}
