"""The diffusion task: what the training loop trains when the base is an image model.

It puts together the base model with LoRA layers (`loracli.training.denoiser.Model`, everything a model
family knows) and the micro-batches of the run's images (`loracli.training.batches.Batches`), and answers
the loop through the task protocol written down in `loracli.training.loop`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from loracli import atomic, families, profiles
from loracli.exporting import provenance
from loracli.training import dataset as ds
from loracli.training.batches import Batch, Batches
from loracli.training.denoiser import Model, render_samples


def _recorded_fingerprint(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "dataset.json").read_text("utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None


def start_run(run_dir: Path, profile: profiles.Profile, version: str,
              warn: Callable[[str], None]) -> None:
    """A new image run: the base resolved (its family detected) and the images scanned before
    anything is written; then profile.toml, dataset.json and run.json (the start hook of
    `loracli.families.base.DIFFUSION`)."""
    import datetime as dt

    from loracli.families import loading
    from loracli.training import quantize

    base = loading.resolve_base(profile.model.base, profile.model.family,
                                profile.model.prediction_type, profile.model.vae)
    family = families.get(base.family)
    quantize.check(profile.model.quantize, family)  # before anything is written
    examples = ds.scan(profile.data.dir, profile.data.caption_ext, profile.data.trigger, warn)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trained = list(family.trainable) if profile.lora.train_text_encoder else [family.denoiser]
    atomic.write_text(run_dir / "profile.toml", profile.to_toml())
    atomic.write_json(run_dir / "dataset.json", {
        "num_images": len(examples), "resolution": profile.data.resolution,
        "tag_frequency": ds.tag_frequency(examples), "fingerprint": ds.fingerprint(examples)})
    atomic.write_json(run_dir / "run.json", {
        "lora_version": version,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile.name, "base": base.to_dict(), "components": trained})


class DiffusionTask:
    """LoRA on a diffusion model's denoiser (and text encoders when the profile trains them)."""

    def __init__(self, run_dir: Path, profile: profiles.Profile, accelerator, weight_dtype,
                 resumed: bool, warn: Callable[[str], None], status: Callable[[str], None]):
        import torch

        self.run_dir, self.profile = Path(run_dir), profile
        d, t = profile.data, profile.train
        examples = ds.scan(d.dir, d.caption_ext, d.trigger, warn)
        if resumed and _recorded_fingerprint(self.run_dir) not in (None, ds.fingerprint(examples)):
            warn(f"images or captions in {d.dir} changed since this run started: the resumed run "
                 "will not match an uninterrupted one")
        status("loading the model")
        self.model = model = Model(self.run_dir, profile, accelerator.device, weight_dtype)
        self.data = ds.plan(examples, d.resolution, model.bucket_step(d.bucket_step, warn),
                            d.bucketing, d.repeats, warn)
        if accelerator.is_main_process:  # folders and buckets, for export's metadata
            provenance.record_dataset(self.run_dir, self.data)
        with accelerator.main_process_first():
            self.batches = Batches(self.data, profile, model, self.run_dir / "cache",
                                   accelerator.process_index, accelerator.num_processes, warn,
                                   status)
        if self.batches.latents is not None:  # the VAE is not needed again: free its memory
            model.vae.to("cpu")
        if self.batches.text is not None:
            if profile.sample.every_steps and profile.sample.prompts:
                for encoder in model.encoders:  # the sample pipeline still needs them
                    encoder.to("cpu")
            else:
                model.release_text_encoders()
        if accelerator.device.type == "cuda":
            torch.cuda.empty_cache()
        if t.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            for name, module in model.trained.items():
                if name != model.denoiser:
                    # non-reentrant: the frozen embeddings need no grad for the LoRA's to flow
                    module.gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": False})
        self.modules = dict(model.trained)
        self.unet = model.unet  # until prepared() hands over the wrapped one
        self.global_batch = self.batches.global_batch
        self.batches_per_epoch = self.batches.per_epoch
        self.facts = {"family": model.base.family, "base": model.base.model,
                      "images": len(examples), "resolution": d.resolution}

    def param_groups(self) -> list[dict]:
        t = self.profile.train
        return [{"params": [p for p in module.parameters() if p.requires_grad],
                 "lr": t.learning_rate if name == self.model.denoiser
                 else (t.text_encoder_lr or t.learning_rate)}
                for name, module in self.modules.items()]

    def prepared(self, modules: dict) -> None:
        """The modules as the loop wraps them (DDP): the loss runs through these."""
        self.unet = modules[self.model.denoiser]
        if len(modules) > 1:  # encode through the DDP wrappers so gradients sync
            self.model.encoders = [modules.get(n, e) for n, e in
                                   zip(self.model.family.text_encoders, self.model.encoders)]

    def micro_batch(self, index: int) -> Batch:
        return self.batches(index)

    def loss(self, batch: Batch):
        text = batch.text if batch.text is not None else self.model.encode_text(batch.captions)
        text = {k: v.to(self.model.device) for k, v in text.items()}
        return self.model.loss(self.unet, batch.latents, text, batch.sizes, batch.noise,
                               batch.timesteps, self.profile.train.min_snr_gamma)

    def adapter_state(self) -> dict:
        return self.model.adapter_state(lambda m: m)

    def load_adapter_state(self, adapters: dict) -> None:
        self.model.load_adapters(adapters)

    def samples(self, step: int) -> list[Path]:
        s = self.profile.sample
        if not (s.every_steps and s.prompts):
            return []
        return render_samples(self.model, self.profile, self.run_dir, step)
