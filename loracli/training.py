"""The training loop: a profile and a folder of images in, LoRA checkpoints out.

`start(profile)` makes (or finds) the run folder; `run(run_dir)` trains it from its newest
complete checkpoint to the end. Resume is exact because nothing in a step depends on hidden
state: the batch order is a pure function of (seed, epoch), every per-image random choice
(caption shuffle/dropout, crop, flip, noise, timestep) comes from a generator seeded by
(seed, micro-batch, position in the global batch), and LoRA dropout draws from the torch RNG
reseeded per micro-batch. A checkpoint then only has to carry the adapter, the optimizer, the
scheduler and the step — plus the RNG states, restored for anything else that might draw.
The loop never prints: it reports through `on_step(metrics)` and `on_warning(message)`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loracli import __version__, atomic, checkpoints, families, profiles, runs
from loracli import dataset as ds
from loracli.errors import LoraError

ADAPTER = "default"  # peft adapter name ("train" would shadow nn.Module.train)


@dataclass
class Result:
    run_dir: Path
    status: str                 # "finished" | "interrupted" | "already-finished"
    step: int
    max_steps: int
    checkpoint: Path | None = None
    loss: float | None = None
    resumed_from: int | None = None

    def to_dict(self) -> dict:
        return {"run": str(self.run_dir), "status": self.status, "step": self.step,
                "max_steps": self.max_steps, "loss": self.loss, "resumed_from": self.resumed_from,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None}


class StopFlag:
    """Set by the first Ctrl+C (finish the step, save, stop); a second one aborts at once."""

    def __init__(self):
        self.requested = False

    def install(self, notify: Callable[[str], None] | None = None) -> dict:
        """Handle SIGINT/SIGTERM (main thread only); returns the handlers it replaced."""
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            if notify:
                notify("stopping after this step and saving a checkpoint "
                       "(press Ctrl+C again to abort without saving)")

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    @contextlib.contextmanager
    def installed(self, notify: Callable[[str], None] | None = None):
        previous = self.install(notify)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


# ---------------------------------------------------------------- the run folder


def _frozen(profile: profiles.Profile) -> profiles.Profile:
    """The profile with its paths made absolute, as the run folder records it."""
    data = profile.to_dict()
    data["data"]["dir"] = str(Path(profile.data.dir).expanduser().resolve())
    out = runs.default_output_dir(profile.name, profile.train.output_dir)
    data["train"]["output_dir"] = str(out.resolve())
    return profiles.parse(data, name=profile.name)


def load_profile(run_dir: Path) -> profiles.Profile:
    path = Path(run_dir) / "profile.toml"
    name = runs.info(run_dir).get("profile", Path(run_dir).name)
    return profiles.parse(profiles.read_mapping(path), name=name, source=str(path))


def changed_keys(old: profiles.Profile, new: profiles.Profile) -> list[str]:
    """`section.key: old → new` for every key that differs."""
    a, b = old.to_dict(), new.to_dict()
    return [f"{s}.{k}: {a[s][k]!r} → {b[s][k]!r}" for s in a for k in a[s] if a[s][k] != b[s][k]]


def start(profile: profiles.Profile, restart: bool = False,
          on_warning: Callable[[str], None] | None = None,
          invocation: str | None = None) -> tuple[Path, bool]:
    """The run folder for `profile`: `(path, True)` when an existing run is to be resumed.

    `invocation` is the command that started it, for the hint (default `lora train --profile NAME`).
    """
    warn = on_warning or (lambda _m: None)
    profile = _frozen(profile)
    run_dir = Path(profile.train.output_dir)
    if (run_dir / "run.json").is_file():
        if restart:
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
            aside = run_dir.with_name(f"{run_dir.name}.{stamp}")
            run_dir.rename(aside)
            warn(f"kept the previous run as {aside}; starting a new one in {run_dir}")
        else:
            changed = changed_keys(load_profile(run_dir), profile)
            if changed:
                raise LoraError(
                    f"profile {profile.name!r} changed since the run in {run_dir} started",
                    f"`lora resume {run_dir}` continues with the run's own settings; "
                    f"`{invocation or 'lora train --profile ' + profile.name} --restart` starts a new run "
                    "(the old one is kept)", details=changed)
            return run_dir, True
    base = families.resolve_base(profile.model.base, profile.model.family,
                                 profile.model.prediction_type)
    family = families.get(base.family)
    examples = ds.scan(profile.data.dir, profile.data.caption_ext, profile.data.trigger, warn)
    run_dir.mkdir(parents=True, exist_ok=True)
    trained = ["unet"] + (list(family.text_encoders) if profile.lora.train_text_encoder else [])
    atomic.write_text(run_dir / "profile.toml", profile.to_toml())
    atomic.write_json(run_dir / "dataset.json", {
        "num_images": len(examples), "resolution": profile.data.resolution,
        "tag_frequency": ds.tag_frequency(examples)})
    atomic.write_json(run_dir / "run.json", {
        "lora_version": __version__,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile.name, "base": base.to_dict(), "components": trained})
    return run_dir, False


def pick_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> runs.Checkpoint | None:
    """The newest complete checkpoint; newer broken ones are named in a warning and skipped."""
    found = runs.checkpoints(run_dir)
    complete = [c for c in found if c.complete]
    for c in found:
        if not c.complete and (not complete or c.step > complete[-1].step):
            warn(f"skipping checkpoint {c.path.name}: {c.problem}")
    if found and not complete:
        raise LoraError(f"{run_dir}: no complete checkpoint to resume from",
                        "`lora train --profile NAME --restart` starts the run again")
    return complete[-1] if complete else None


# ---------------------------------------------------------------- the loop


def _seed(*parts: int) -> int:
    import numpy as np

    return int(np.random.default_rng(list(parts)).integers(2**62))


def rng_states() -> dict:
    import random

    import numpy as np
    import torch

    out = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _lora_config(rank, alpha, dropout, targets, rslora, dora):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      use_rslora=rslora, use_dora=dora, init_lora_weights=True)


def _scheduler(t, optimizer, max_steps: int):
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if t.scheduler == "constant" and t.warmup_steps else t.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps,
                         num_training_steps=max_steps)


def _optimizer(t, groups, cuda: bool):
    import torch

    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is None or not cuda:
            raise LoraError("optimizer adamw8bit needs bitsandbytes and a CUDA GPU",
                            "pip install bitsandbytes (on a CUDA machine), or --set "
                            "train.optimizer=adamw")
        return bnb.optim.AdamW8bit(groups, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=cuda or None)


class Model:
    """The base model with LoRA layers, ready for the loss; shared by `run` and `evaluate`."""

    def __init__(self, run_dir: Path, profile: profiles.Profile, device, weight_dtype):
        import torch
        from diffusers import DDPMScheduler
        from peft import inject_adapter_in_model

        info = runs.info(run_dir)
        self.base = families.Base.from_dict(info["base"])
        self.family = families.get(self.base.family)
        self.prediction = self.base.prediction_type
        parts = families.load_components(self.base, self.family, profile.model.vae)
        self.unet, self.vae = parts["unet"], parts["vae"]
        self.encoders = [parts[n] for n in self.family.text_encoders]
        self.tokenizers = [parts[n] for n in self.family.tokenizers]
        self.noise = DDPMScheduler.from_config(parts["scheduler"].config)
        self.parts = parts  # the loaded components by name, for sample pipelines
        self.scaling = self.vae.config.scaling_factor
        self.shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        self.device, self.weight_dtype = device, weight_dtype
        l = profile.lora
        self.configs = {"unet": _lora_config(l.rank, l.alpha, l.dropout, l.targets, l.rslora,
                                             l.dora)}
        if l.train_text_encoder:
            for name in self.family.text_encoders:
                self.configs[name] = _lora_config(l.rank, l.alpha, l.dropout,
                                                  l.text_encoder_targets, l.rslora, l.dora)
        self.trained = {}
        torch.manual_seed(_seed(profile.train.seed, 3))  # LoRA A matrices start random: same seed, same start
        for module in (self.unet, self.vae, *self.encoders):
            module.requires_grad_(False)
            module.to(device)
            if weight_dtype != torch.float32:
                module.to(dtype=weight_dtype)
        for name, config in self.configs.items():
            module = self.unet if name == "unet" else parts[name]
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
            for p in module.parameters():
                if p.requires_grad:  # LoRA weights train in fp32 whatever the base dtype
                    p.data = p.data.to(torch.float32)
            self.trained[name] = module
        self.alphas = self.noise.alphas_cumprod.to(device)

    def adapter_state(self, unwrap) -> dict:
        from peft import get_peft_model_state_dict

        return {name: (get_peft_model_state_dict(unwrap(m), adapter_name=ADAPTER), self.configs[name])
                for name, m in self.trained.items()}

    def load_adapters(self, adapters: dict) -> None:
        from peft import set_peft_model_state_dict

        for name, sd in adapters.items():
            result = set_peft_model_state_dict(self.trained[name], sd, adapter_name=ADAPTER)
            if getattr(result, "unexpected_keys", None):
                raise LoraError(f"checkpoint {name} adapter does not fit this model "
                                f"({len(result.unexpected_keys)} unknown keys)")

    def encode_text(self, captions: list[str]) -> dict:
        return self.family.encode(self.encoders, self.tokenizers, captions, self.device)

    def encode_pixels(self, pixels):
        import torch

        with torch.no_grad():
            latent = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mean
        return latent.float()

    def loss(self, unet, latents, text, sizes, noise, timesteps, min_snr_gamma: float):
        """Per-sample denoising MSE (min-SNR weighted when asked), averaged."""
        import torch.nn.functional as F

        latents = (latents.to(self.device) - self.shift) * self.scaling
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        noisy = self.noise.add_noise(latents, noise, timesteps)
        target = noise if self.prediction == "epsilon" else \
            self.noise.get_velocity(latents, noise, timesteps)
        cond = self.family.conditioning(text, sizes)
        pred = unet(noisy.to(self.weight_dtype), timesteps, **cond).sample
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if min_snr_gamma > 0:
            a = self.alphas[timesteps]
            snr = a / (1 - a)
            clipped = snr.clamp(max=min_snr_gamma)
            per = per * (clipped / snr if self.prediction == "epsilon" else clipped / (snr + 1))
        return per.mean()


class Batches:
    """The inputs of micro-batch `micro` on this process: a pure function of (seed, micro).

    Every image's random choices come from generators seeded by (seed, micro, its position in
    the global batch), so 1 process × batch 4 and 2 processes × batch 2 draw the same numbers,
    and a resumed run draws what the uninterrupted one would have.
    """

    def __init__(self, data: ds.Dataset, profile: profiles.Profile, model: Model, cache_root: Path,
                 rank: int, processes: int, warn: Callable[[str], None]):
        from loracli import caching

        self.data, self.model = data, model
        self.d, self.t, self.seed = profile.data, profile.train, profile.train.seed
        self.local = profile.train.batch_size
        self.rank, self.global_batch = rank, self.local * processes
        self.per_epoch = ds.batches_per_epoch(data, self.global_batch)
        self._epoch: tuple[int, list] | None = None
        self.crop = self.d.crop
        self.latents: dict | None = None
        self.text: dict | None = None
        if self.t.cache_latents:
            if self.crop == "random":
                warn("data.crop = random needs train.cache_latents = false; using center crops")
                self.crop = "center"
            cache = caching.LatentCache(cache_root, caching.model_fingerprint(
                model.base.path, ("vae",)) + profile.model.vae)
            flips = (False, True) if self.d.flip else (False,)
            self.latents = {(i, f): cache.get(s, f, self._encode_one)
                            for i, s in enumerate(data.samples) for f in flips}
        text_frozen = "text_encoder" not in model.trained
        if self.t.cache_text and text_frozen and not self.d.shuffle_captions:
            cache = caching.TextCache(cache_root, caching.model_fingerprint(
                model.base.path, model.family.text_encoders + model.family.tokenizers))
            captions = {s.example.caption for s in data.samples}
            if self.d.caption_dropout > 0:
                captions.add("")
            self.text = {c: cache.get(c, model.encode_text) for c in sorted(captions)}

    def _encode_one(self, sample: ds.Sample, flip: bool):
        resized, top_left = ds.geometry(sample, "center")
        return self.model.encode_pixels(ds.load_pixels(sample, resized, top_left, flip)[None])[0]

    def position(self, micro: int) -> tuple[int, int]:
        return divmod(micro, self.per_epoch)

    def __call__(self, micro: int):
        import numpy as np
        import torch

        epoch, index = self.position(micro)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, ds.epoch_batches(self.data, self.global_batch, self.seed, epoch))
        batch = self._epoch[1][index]
        start = self.rank * self.local
        captions, latents, pixels, sizes, noise, timesteps = [], [], [], [], [], []
        T = self.model.noise.config.num_train_timesteps
        for j in range(start, start + self.local):
            sample_index = batch[j]
            sample = self.data.samples[sample_index]
            aug = np.random.default_rng([self.seed, micro, j, 0])
            captions.append(ds.transform_caption(sample.example.caption, aug,
                                                 self.d.shuffle_captions, self.d.keep_tokens,
                                                 self.d.caption_dropout))
            flip = bool(self.d.flip and aug.random() < 0.5)
            resized, top_left = ds.geometry(sample, self.crop, aug)
            if self.latents is not None:
                latents.append(self.latents[(sample_index, flip)])
            else:
                pixels.append(ds.load_pixels(sample, resized, top_left, flip))
            (bw, bh), (w, h) = sample.bucket, sample.size
            sizes.append(((h, w), top_left, (bh, bw)))
            g = torch.Generator().manual_seed(_seed(self.seed, micro, j, 1))
            shape = (4, bh // 8, bw // 8)
            n = torch.randn(shape, generator=g)
            if self.t.noise_offset:
                n = n + self.t.noise_offset * torch.randn((shape[0], 1, 1), generator=g)
            noise.append(n)
            timesteps.append(torch.randint(0, T, (1,), generator=g))
        if self.latents is None:
            latents = list(self.model.encode_pixels(torch.stack(pixels)))
        if self.text is not None:
            text = {k: torch.stack([self.text[c][k] for c in captions]).to(self.model.device)
                    for k in self.text[captions[0]]}
        else:
            text = self.model.encode_text(captions)
        size_tensors = {name: torch.tensor([s[i] for s in sizes], dtype=torch.float32)
                        for i, name in enumerate(("original_size", "crop_top_left", "target_size"))}
        return epoch, torch.stack(latents), text, size_tensors, torch.stack(noise), torch.cat(timesteps)


def _memory(device) -> float:
    """Peak memory in MiB: CUDA allocator peak on a GPU, the process's peak RSS otherwise."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _trim_metrics(path: Path, step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint; they will be redone."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text("utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic.write_text(path, "".join(line + "\n" for line in keep))


def run(run_dir: Path, on_step: Callable[[dict], None] | None = None,
        on_warning: Callable[[str], None] | None = None, stop: StopFlag | None = None,
        extra_steps: int = 0, until_step: int = 0) -> Result:
    """Train the run in `run_dir` from its newest complete checkpoint (or from the start)."""
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs

    run_dir = Path(run_dir)
    profile = load_profile(run_dir)
    d, t = profile.data, profile.train
    cuda = torch.cuda.is_available()
    mixed = t.mixed_precision if cuda else "no"
    ddp = DistributedDataParallelKwargs(find_unused_parameters=profile.lora.train_text_encoder)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=mixed, kwargs_handlers=[ddp])
    main = accelerator.is_main_process
    warn = (on_warning or (lambda _m: None)) if main else (lambda _m: None)
    if not cuda and t.mixed_precision != "no":
        warn(f"no CUDA GPU: training in fp32 (mixed_precision = {t.mixed_precision} applies on a GPU)")
    stop = stop or StopFlag()

    if main:
        checkpoints.clean_partial(run_dir)
    ckpt = pick_checkpoint(run_dir, warn)
    saved = checkpoints.load(ckpt.path) if ckpt else None
    state = saved["state"] if saved else {}

    examples = ds.scan(d.dir, d.caption_ext, d.trigger, warn)
    data = ds.plan(examples, d.resolution, d.bucket_step, d.bucketing, d.repeats, warn)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    model = Model(run_dir, profile, accelerator.device, weight_dtype)
    with accelerator.main_process_first():
        batches = Batches(data, profile, model, run_dir / "cache", accelerator.process_index,
                          accelerator.num_processes, warn)
    if batches.latents is not None:  # the VAE is not needed again: free its memory
        model.vae.to("cpu")
    if batches.text is not None:
        for encoder in model.encoders:
            encoder.to("cpu")
    if cuda:
        torch.cuda.empty_cache()
    if t.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for name, module in model.trained.items():
            if name != "unet":
                module.gradient_checkpointing_enable()

    accum = t.gradient_accumulation
    if state.get("global_batch", batches.global_batch) != batches.global_batch:
        raise LoraError(f"this run was trained with a global batch of {state['global_batch']} "
                        f"images; now it would be {batches.global_batch}",
                        f"resume with --processes {state.get('processes', 1)}")
    max_steps = state.get("max_steps") or t.max_steps or \
        t.epochs * math.ceil(batches.per_epoch / accum)
    max_steps = until_step or (max_steps + extra_steps)
    start_step = state.get("step", 0)
    result = Result(run_dir, "already-finished", start_step, max_steps, ckpt.path if ckpt else None,
                    state.get("loss"), start_step if ckpt else None)
    if start_step >= max_steps:
        return result

    if saved:
        model.load_adapters(saved["adapters"])
    groups = [{"params": [p for p in model.unet.parameters() if p.requires_grad],
               "lr": t.learning_rate}]
    for name, module in model.trained.items():
        if name != "unet":
            groups.append({"params": [p for p in module.parameters() if p.requires_grad],
                           "lr": t.text_encoder_lr or t.learning_rate})
    optimizer = _optimizer(t, groups, cuda)
    lr_scheduler = _scheduler(t, optimizer, max_steps)
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        lr_scheduler.load_state_dict(saved["scheduler"])
        set_rng_states(saved["rng"])
    names = list(model.trained)
    prepared = accelerator.prepare(*model.trained.values(), optimizer)
    wrapped, optimizer = dict(zip(names, prepared[:-1])), prepared[-1]
    unet = wrapped["unet"]
    if "text_encoder" in wrapped:  # encode through the DDP wrappers so gradients sync
        model.encoders = [wrapped.get(n, e) for n, e in zip(model.family.text_encoders, model.encoders)]
    params = [p for g in groups for p in g["params"]]

    metrics_path = run_dir / "logs" / "metrics.jsonl"
    if main:
        _trim_metrics(metrics_path, start_step)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(metrics_path, "a", encoding="utf-8") if main else None
    for module in wrapped.values():
        module.train()
    smooth = None
    started = time.perf_counter()
    try:
        for step in range(start_step, max_steps):
            t0 = time.perf_counter()
            losses = []
            for a in range(accum):
                micro = step * accum + a
                epoch, latents, text, sizes, noise, timesteps = batches(micro)
                syncing = contextlib.ExitStack()
                if a < accum - 1:
                    for module in wrapped.values():
                        syncing.enter_context(accelerator.no_sync(module))
                with syncing:
                    # LoRA dropout draws from the global RNG: make it a function of the batch
                    torch.manual_seed(_seed(t.seed, micro, accelerator.process_index, 2))
                    with accelerator.autocast():
                        loss = model.loss(unet, latents, text, sizes, noise, timesteps,
                                          t.min_snr_gamma)
                    accelerator.backward(loss / accum)
                losses.append(loss.detach())
            if t.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
            done = step + 1
            if not math.isfinite(loss_value):
                last = runs.checkpoints(run_dir, deep=False)
                kept = next((c.path.name for c in reversed(last) if c.complete), "none")
                raise LoraError(
                    f"the loss became {loss_value} at step {done}; stopped (last good "
                    f"checkpoint: {kept})",
                    "lower train.learning_rate (e.g. halve it), use mixed_precision = \"bf16\" "
                    "or \"no\", or set train.max_grad_norm = 1.0; then `lora resume` this run")
            halt = stop.requested
            if accelerator.num_processes > 1:  # every process must agree to stop on the same step
                flag = torch.tensor([1.0 if halt else 0.0], device=accelerator.device)
                halt = accelerator.reduce(flag, "sum").item() > 0
            smooth = loss_value if smooth is None else 0.9 * smooth + 0.1 * loss_value
            seconds = time.perf_counter() - t0
            epoch_now = (done * accum) / batches.per_epoch
            metrics = {"step": done, "max_steps": max_steps, "epoch": round(epoch_now, 4),
                       "loss": loss_value, "loss_smooth": smooth,
                       "lr": lr_scheduler.get_last_lr()[0], "seconds": round(seconds, 4),
                       "images_per_s": round(batches.global_batch * accum / seconds, 3),
                       "memory_mib": round(_memory(accelerator.device), 1),
                       "elapsed": round(time.perf_counter() - started, 3)}
            if log:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            save = done % t.save_steps == 0 or done == max_steps or halt
            if save:
                if main:
                    path = checkpoints.save(
                        run_dir, done, model.adapter_state(accelerator.unwrap_model),
                        {"optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict(),
                         "rng": rng_states()},
                        {"epoch": int(done * accum // batches.per_epoch), "max_steps": max_steps,
                         "micro_batches": done * accum, "seed": t.seed, "loss": loss_value,
                         "processes": accelerator.num_processes,
                         "global_batch": batches.global_batch,
                         "batches_per_epoch": batches.per_epoch, "lora_version": __version__},
                        t.keep_checkpoints)
                    metrics["checkpoint"] = str(path)
                    result.checkpoint = path
                    log.flush()
                    from loracli import plot

                    plot.write(metrics_path, run_dir / "loss.png")
                accelerator.wait_for_everyone()
            sample = profile.sample
            if sample.every_steps and sample.prompts and \
                    (done % sample.every_steps == 0 or done == max_steps):
                if main:
                    metrics["samples"] = [str(p) for p in render_samples(
                        model, profile, run_dir, done, accelerator.unwrap_model)]
                accelerator.wait_for_everyone()
            result.step, result.loss = done, loss_value
            if main and on_step:
                on_step(metrics)
            if halt:
                result.status = "interrupted"
                return result
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            raise LoraError(f"out of GPU memory at step {result.step + 1}",
                            "lower train.batch_size (raise train.gradient_accumulation to keep the "
                            "effective batch), set train.gradient_checkpointing = true, lower "
                            "data.resolution or use mixed_precision = \"bf16\"; then `lora resume`"
                            ) from None
        raise
    finally:
        if log:
            log.close()
    result.status = "finished"
    return result


def render_samples(model: Model, profile: profiles.Profile, run_dir: Path, step: int,
                   unwrap=lambda m: m) -> list[Path]:
    """Images for the profile's sample prompts with the LoRA as it is now: samples/step-N-i.png.

    The pipeline is built from the components in memory (whatever the family's pipeline class
    needs; optional parts left empty). Seeded generators only: the training RNG is untouched.
    """
    import inspect
    import io

    import diffusers
    import torch

    s, res = profile.sample, profile.data.resolution // 8 * 8
    cls = getattr(diffusers, model.family.pipeline)
    parts = {**model.parts, "unet": unwrap(model.unet)}
    for name in model.trained:
        parts[name] = unwrap(model.trained[name])
    params = inspect.signature(cls.__init__).parameters
    kwargs = {n: parts.get(n) for n, p in params.items()
              if n != "self" and (n in parts or p.default is inspect.Parameter.empty)}
    for flag in ("requires_safety_checker", "add_watermarker"):
        if flag in params:
            kwargs[flag] = False
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    moved = [m for m in (model.vae, *(parts[n] for n in model.family.text_encoders))
             if m.device != model.device]
    for m in moved:
        m.to(model.device)
    trained = [unwrap(m) for m in model.trained.values()]
    for m in trained:
        m.eval()
    paths = []
    try:
        with torch.no_grad():
            for i, prompt in enumerate(s.prompts):
                g = torch.Generator("cpu").manual_seed(s.seed + i)
                image = pipe(prompt, num_inference_steps=s.steps, guidance_scale=s.guidance,
                             generator=g, height=res, width=res).images[0]
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                path = Path(run_dir) / "samples" / f"step-{step:06d}-{i:02d}.png"
                atomic.write_bytes(path, buf.getvalue())
                paths.append(path)
    finally:
        for m in trained:
            m.train()
        for m in moved:
            m.to("cpu")
    return paths


def evaluate(run_dir: Path, step: int | None = None, use_lora: bool = True, draws: int = 8,
             seed: int = 1234) -> float:
    """Mean denoising loss over the run's images with fixed noise and timesteps.

    With `use_lora=False` the adapter stays at its initial value (lora_B = 0), which is the base
    model exactly; comparing the two shows what training changed.
    """
    import torch

    run_dir = Path(run_dir)
    profile = load_profile(run_dir)
    d = profile.data
    data = ds.plan(ds.scan(d.dir, d.caption_ext, d.trigger), d.resolution, d.bucket_step,
                   d.bucketing)
    model = Model(run_dir, profile, torch.device("cpu"), torch.float32)
    if use_lora:
        model.load_adapters(checkpoints.load(runs.latest(run_dir, step).path)["adapters"])
    for module in model.trained.values():
        module.eval()
    T = model.noise.config.num_train_timesteps
    total, count = 0.0, 0
    with torch.no_grad():
        for i, sample in enumerate(data.samples):
            resized, top_left = ds.geometry(sample, "center")
            latent = model.encode_pixels(ds.load_pixels(sample, resized, top_left, False)[None])
            text = model.encode_text([sample.example.caption])
            (bw, bh), (w, h) = sample.bucket, sample.size
            sizes = {"original_size": torch.tensor([[h, w]], dtype=torch.float32),
                     "crop_top_left": torch.tensor([top_left], dtype=torch.float32),
                     "target_size": torch.tensor([[bh, bw]], dtype=torch.float32)}
            for k in range(draws):
                g = torch.Generator().manual_seed(_seed(seed, i, k))
                noise = torch.randn(latent.shape, generator=g)
                timesteps = torch.randint(0, T, (1,), generator=g)
                total += model.loss(model.unet, latent, text, sizes, noise, timesteps, 0.0).item()
                count += 1
    return total / count
