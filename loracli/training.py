"""The training loop: a profile and a folder of images in, LoRA checkpoints out.

`start(profile)` makes (or finds) the run folder (`loracli.runs`); `run(run_dir)` trains it from
its newest complete checkpoint to the end; `evaluate(run_dir)` scores it (`loracli.denoiser`).

Resume is exact because nothing in a step depends on hidden state: the batch order is a pure
function of (seed, epoch); every per-image random choice (caption shuffle and dropout, crop,
flip, noise, timestep) comes from a generator seeded by (seed, micro-batch, position in the
global batch); and LoRA dropout draws from the torch RNG reseeded per micro-batch. A checkpoint then only has to carry the adapter, the optimizer, the
scheduler and the step — plus the RNG states, restored for anything else that might draw.
The loop never prints: it reports through `on_step(metrics)` and `on_warning(message)`.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loracli import __version__, atomic, checkpoints, profiles, provenance, runs
from loracli import dataset as ds
from loracli.denoiser import Model, evaluate, render_samples, seed_from  # noqa: F401 (API)
from loracli.errors import LoraError
from loracli.runs import changed_keys, load_profile, start  # noqa: F401 (the API in one place)


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

    def install(self, notify: Callable[[str], None] | None = None,
                abort_on_second: bool = True) -> dict:
        """Handle SIGINT/SIGTERM (main thread only); returns the handlers it replaced.

        Workers under `accelerate launch` pass abort_on_second=False: the launcher relays the
        user's Ctrl+C as a second signal, and must not cut the save short.
        """
        def handler(signum, frame):
            if self.requested:
                if abort_on_second:
                    raise KeyboardInterrupt
                return
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


# ---------------------------------------------------------------- the loop


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
        if self.t.cache_text and not model.trains_text and not self.d.shuffle_captions:
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
            g = torch.Generator().manual_seed(seed_from(self.seed, micro, j, 1))
            shape = self.model.latent_shape(bh, bw)
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
        return (epoch, torch.stack(latents), text, size_tensors, torch.stack(noise),
                torch.cat(timesteps))


def _memory(device) -> float:
    """Peak memory in MiB: CUDA allocator peak on a GPU, the process's peak RSS otherwise."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # Linux: this process's own high-water mark (ru_maxrss can carry a parent's over exec)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _recorded_fingerprint(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "dataset.json").read_text("utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None


def _trim_metrics(path: Path, step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint; they will be redone."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text("utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic.write_text(path, "".join(line + "\n" for line in keep))


def _checkpoint(run_dir: Path, step: int, model: Model, optimizer, lr_scheduler, facts: dict,
                keep: int, unwrap) -> Path:
    """Save everything resume needs at `step`, then redraw loss.png from the metrics so far."""
    from loracli import plot

    path = checkpoints.save(
        run_dir, step, model.adapter_state(unwrap),
        {"optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict(),
         "rng": rng_states()},
        {**facts, "lora_version": __version__}, keep)
    plot.write(run_dir / "logs" / "metrics.jsonl", run_dir / "loss.png")
    return path


def run(run_dir: Path, on_step: Callable[[dict], None] | None = None,
        on_warning: Callable[[str], None] | None = None, stop: StopFlag | None = None,
        extra_steps: int = 0, until_step: int = 0) -> Result:
    """Train the run in `run_dir` from its newest complete checkpoint (or from the start)."""
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs

    run_dir = Path(run_dir)
    profile = runs.load_profile(run_dir)
    d, t = profile.data, profile.train
    cuda = torch.cuda.is_available()
    mixed = t.mixed_precision if cuda else "no"
    ddp = DistributedDataParallelKwargs(find_unused_parameters=profile.lora.train_text_encoder)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=mixed, kwargs_handlers=[ddp])
    main = accelerator.is_main_process
    warn = (on_warning or (lambda _m: None)) if main else (lambda _m: None)
    if not cuda and t.mixed_precision != "no":
        warn(f"no CUDA GPU: training in fp32 "
             f"(mixed_precision = {t.mixed_precision} applies on a GPU)")
    stop = stop or StopFlag()

    if main:
        checkpoints.clean_partial(run_dir)
    ckpt = runs.pick_checkpoint(run_dir, warn)
    saved = checkpoints.load(ckpt.path) if ckpt else None
    state = saved["state"] if saved else {}

    examples = ds.scan(d.dir, d.caption_ext, d.trigger, warn)
    if ckpt and _recorded_fingerprint(run_dir) not in (None, ds.fingerprint(examples)):
        warn(f"images or captions in {d.dir} changed since this run started: the resumed run "
             "will not match an uninterrupted one")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    model = Model(run_dir, profile, accelerator.device, weight_dtype)
    data = ds.plan(examples, d.resolution, model.bucket_step(d.bucket_step, warn), d.bucketing,
                   d.repeats, warn)
    if main:
        provenance.record_dataset(run_dir, data)  # folders and buckets, for export's metadata
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
                # non-reentrant: the frozen embeddings need no grad for the LoRA's to flow
                module.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})

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
    groups = [{"params": [p for p in module.parameters() if p.requires_grad],
               "lr": t.learning_rate if name == "unet" else (t.text_encoder_lr or t.learning_rate)}
              for name, module in model.trained.items()]
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
    if model.trains_text:  # encode through the DDP wrappers so gradients sync
        model.encoders = [wrapped.get(n, e)
                          for n, e in zip(model.family.text_encoders, model.encoders)]
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
                    torch.manual_seed(seed_from(t.seed, micro, accelerator.process_index, 2))
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
                    facts = {"epoch": int(done * accum // batches.per_epoch),
                             "max_steps": max_steps, "micro_batches": done * accum,
                             "seed": t.seed, "loss": loss_value,
                             "processes": accelerator.num_processes,
                             "global_batch": batches.global_batch,
                             "batches_per_epoch": batches.per_epoch}
                    result.checkpoint = _checkpoint(run_dir, done, model, optimizer, lr_scheduler,
                                                    facts, t.keep_checkpoints,
                                                    accelerator.unwrap_model)
                    metrics["checkpoint"] = str(result.checkpoint)
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


