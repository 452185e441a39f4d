"""The training loop: a run folder in, LoRA checkpoints out.

`runs.start(profile)` makes (or finds) the run folder; `run(run_dir)` trains it from its newest
complete checkpoint to the end: `_setup` builds everything, `_loop` reads top to bottom.

What is trained on is a *task*; the loop knows nothing else about the model or the data. The
run's family (run.json's base.family) names it (`family.runs.task`, see `loracli.families.base.
RunKind`): `loracli.training.diffusion.DiffusionTask` (a diffusion model's denoiser) or
`loracli.llm.task.CausalLMTask` (a language model); a task has:

    modules              {name: nn.Module} with LoRA layers injected (their LoRA parameters
                         require grad, nothing else does); the loop wraps them for DDP
    param_groups()       optimizer groups: [{"params": [...], "lr": ...}, ...]
    prepared(modules)    the wrapped modules, once: the loss must run through these
    global_batch         examples per micro-batch over all processes (a resume must keep it)
    batches_per_epoch    micro-batches per epoch (epochs mode, the epoch in the metrics)
    facts                {"family", "base", "images", "resolution"} for `on_start`
    micro_batch(i)       the inputs of micro-batch i on this process: a pure function of
                         (seed, i), so a resumed run sees what the uninterrupted one would
    loss(batch)          the scalar mean loss of one micro-batch (the loop averages micro-batches
                         and draws LoRA dropout from a torch RNG it reseeds per micro-batch)
    adapter_state()      {name: (peft state dict, LoraConfig)}: what a checkpoint stores
    load_adapter_state(d) the reverse, {name: state dict}
    samples(step)        paths of sample outputs made now (main process, at [sample] steps)
    evaluate()           optional: held-out figures ({"eval_loss", …}) recorded at checkpoints

Resume is exact because nothing in a step depends on hidden state: batches and LoRA dropout are
functions of (seed, micro-batch); a checkpoint carries the adapter, optimizer, scheduler, step,
and the RNG states for anything else that might draw. The loop never prints: it reports through
`on_start(info)`, `on_status(text)` (phases before the first step), `on_step(metrics)` and
`on_warning(message)`; metrics go to `logs/metrics.jsonl`, `loss.png` and, when `train.log_with`
asks, TensorBoard or W&B (`loracli.training.metrics`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loracli import __version__
from loracli.errors import LoraError
from loracli.training import checkpoints, metrics, plot, runs, statefiles
from loracli.training.batches import Batches  # noqa: F401 (training.Batches, as before the split)
from loracli.training.denoiser import (evaluate,  # noqa: F401 (evaluate: the API in one place)
                                       seed_from)
from loracli.training.optim import make_optimizer, make_scheduler
from loracli.training.runs import (changed_keys, load_profile,  # noqa: F401 (the API in one place)
                                   start)
from loracli.training.stopping import StopFlag  # noqa: F401 (the API in one place)


@dataclass
class Result:
    run_dir: Path
    status: str                 # "finished" | "interrupted" | "already-finished"
    step: int
    max_steps: int
    checkpoint: Path | None = None
    loss: float | None = None
    resumed_from: int | None = None
    eval: dict | None = None    # held-out figures at the last checkpoint, when the task has them

    def to_dict(self) -> dict:
        return {"run": str(self.run_dir), "status": self.status, "step": self.step,
                "max_steps": self.max_steps, "loss": self.loss, "resumed_from": self.resumed_from,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                **({"eval": self.eval} if self.eval else {})}


def _quiet(_arg) -> None:
    pass


@dataclass
class Setup:
    run_dir: Path
    profile: object
    accelerator: object
    task: object
    state: dict                 # the checkpoint's state.json ({} for a new run)
    start_step: int
    max_steps: int
    result: Result
    optimizer: object = None
    scheduler: object = None
    modules: dict | None = None
    plotter: plot.Redrawer | None = None


def _setup(run_dir: Path, warn, status, extra_steps: int, until_step: int) -> Setup:
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs

    profile = runs.load_profile(run_dir)
    t = profile.train
    cuda = torch.cuda.is_available()
    mixed = t.mixed_precision if cuda else "no"
    ddp = DistributedDataParallelKwargs(find_unused_parameters=profile.lora.train_text_encoder)
    tracker = metrics.tracker(t)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=mixed, kwargs_handlers=[ddp],
                              log_with=tracker,
                              project_dir=str(run_dir / "logs") if tracker else None)
    if not accelerator.is_main_process:
        warn = status = _quiet
    if not cuda and t.mixed_precision != "no":
        warn(f"no CUDA GPU: training in fp32 "
             f"(mixed_precision = {t.mixed_precision} applies on a GPU)")

    if accelerator.is_main_process:
        checkpoints.clean_partial(run_dir)
    ckpt = runs.pick_checkpoint(run_dir, warn)
    saved = checkpoints.load(ckpt.path) if ckpt else None  # refuses pickled (old) checkpoints
    state = saved["state"] if saved else {}
    if ckpt:
        status(f"resuming from step {ckpt.step}")

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    kind = runs.family_of(run_dir).runs  # the family's runs: diffusion, causal LM, …
    task = kind.load("task")(run_dir, profile, accelerator, weight_dtype, ckpt is not None,
                             warn, status)
    accum = t.gradient_accumulation
    if state.get("global_batch", task.global_batch) != task.global_batch:
        raise LoraError(f"this run was trained with a global batch of {state['global_batch']} "
                        f"{kind.unit}; now it would be {task.global_batch}",
                        f"resume with --processes {state.get('processes', 1)}")
    max_steps = state.get("max_steps") or t.max_steps or \
        t.epochs * math.ceil(task.batches_per_epoch / accum)
    max_steps = until_step or (max_steps + extra_steps)
    start_step = state.get("step", 0)
    result = Result(run_dir, "already-finished", start_step, max_steps, ckpt.path if ckpt else None,
                    state.get("loss"), start_step if ckpt else None)
    s = Setup(run_dir, profile, accelerator, task, state, start_step, max_steps, result)
    if start_step >= max_steps:
        return s

    if saved:
        task.load_adapter_state(saved["adapters"])
    groups = task.param_groups()
    s.optimizer = make_optimizer(t, groups, cuda)
    s.scheduler = make_scheduler(t, s.optimizer, max_steps)
    if saved:
        s.optimizer.load_state_dict(saved["optimizer"])
        s.scheduler.load_state_dict(saved["scheduler"])
        statefiles.set_rng_states(saved["rng"])
    names = list(task.modules)
    prepared = accelerator.prepare(*task.modules.values(), s.optimizer)
    s.modules, s.optimizer = dict(zip(names, prepared[:-1])), prepared[-1]
    task.prepared(s.modules)
    return s


def run(run_dir: Path, on_step: Callable[[dict], None] | None = None,
        on_warning: Callable[[str], None] | None = None, stop: StopFlag | None = None,
        extra_steps: int = 0, until_step: int = 0,
        on_start: Callable[[dict], None] | None = None,
        on_status: Callable[[str], None] | None = None) -> Result:
    """Train the run in `run_dir` from its newest complete checkpoint (or from the start)."""
    run_dir = Path(run_dir)
    s = _setup(run_dir, on_warning or _quiet, on_status or _quiet, extra_steps, until_step)
    if s.start_step >= s.max_steps:
        return s.result
    if s.accelerator.is_main_process and on_start:
        p = s.profile
        on_start({"run": str(run_dir), "profile": p.name, **s.task.facts,
                  "batch_size": p.train.batch_size, "max_steps": s.max_steps,
                  "start_step": s.start_step, "resumed": s.result.resumed_from is not None,
                  "processes": s.accelerator.num_processes})
    try:
        return _loop(s, on_step or _quiet, stop or StopFlag())
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            raise LoraError(f"out of GPU memory at step {s.result.step + 1}",
                            "lower train.batch_size (raise train.gradient_accumulation to keep the "
                            "effective batch), set train.gradient_checkpointing = true, lower "
                            "data.resolution or use mixed_precision = \"bf16\"; then `lora resume`"
                            ) from None
        raise


def _loop(s: Setup, on_step: Callable[[dict], None], stop: StopFlag) -> Result:
    import torch

    accelerator, task, t, result = s.accelerator, s.task, s.profile.train, s.result
    main, rank, accum = accelerator.is_main_process, accelerator.process_index, \
        t.gradient_accumulation
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    log = metrics.Log(s.run_dir, s.start_step, s.state, main)
    s.plotter = plot.Redrawer(metrics.path(s.run_dir), s.run_dir / "loss.png")
    tracking = metrics.tracker(t) if main else None
    if tracking:
        metrics.start_tracker(accelerator, tracking, s.run_dir, s.profile)
    for module in s.modules.values():
        module.train()
    try:
        for step in range(s.start_step, s.max_steps):
            t0 = time.perf_counter()
            losses = []
            for a in range(accum):
                micro = step * accum + a
                batch = task.micro_batch(micro)
                with _no_sync(accelerator, s.modules, last=a == accum - 1):
                    _reseed(accelerator.device, seed_from(t.seed, micro, rank, 2))
                    with accelerator.autocast():
                        loss = task.loss(batch)
                    accelerator.backward(loss / accum)
                losses.append(loss.detach())
            if t.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, t.max_grad_norm)
            s.optimizer.step()
            s.scheduler.step()
            s.optimizer.zero_grad(set_to_none=True)
            # the one sync point of a step: the loss every process agrees on
            loss_value = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
            done = step + 1
            if not math.isfinite(loss_value):
                raise _diverged(s.run_dir, loss_value, done)
            halt = _agree(accelerator, stop.requested)
            row = log.row(done, s.max_steps, done * accum / task.batches_per_epoch, loss_value,
                          s.scheduler.get_last_lr()[0], time.perf_counter() - t0, task.global_batch * accum,
                          accelerator.device)
            _guard_write(s, "logs/metrics.jsonl", log.write, row)
            if tracking:
                metrics.track(accelerator, row)
            if done % t.save_steps == 0 or done == s.max_steps or halt:
                if main:
                    result.checkpoint = _checkpoint(s, done, loss_value, log)
                    row["checkpoint"] = str(result.checkpoint)
                accelerator.wait_for_everyone()
            sample = s.profile.sample
            if sample.every_steps and sample.prompts and \
                    (done % sample.every_steps == 0 or done == s.max_steps):
                if main:
                    paths = task.samples(done)
                    row["samples"] = [str(p) for p in paths]
                    if tracking:
                        metrics.track_samples(accelerator, paths, done)
                accelerator.wait_for_everyone()
            result.step, result.loss = done, loss_value
            if main:
                on_step(row)
            if halt:
                result.status = "interrupted"
                break
        _guard_write(s, "loss.png", s.plotter.wait)
    finally:
        log.close()
        if s.plotter.thread is not None:  # an error or a second Ctrl+C: let the drawing end
            s.plotter.thread.join()
        if tracking:  # not end_training(): it would also end the process group
            for tracker in accelerator.trackers:
                tracker.finish()
    if result.status != "interrupted":
        result.status = "finished"
    return result


def _reseed(device, seed: int) -> None:
    """LoRA dropout draws from the global RNG: make it a function of the micro-batch.

    Only the generators a step can draw from (torch.manual_seed also walks every other backend,
    milliseconds per call).
    """
    import torch

    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def _no_sync(accelerator, modules: dict, last: bool):
    """Gradient accumulation: DDP syncs gradients only on the last micro-batch of a step."""
    stack = contextlib.ExitStack()
    if not last:
        for module in modules.values():
            stack.enter_context(accelerator.no_sync(module))
    return stack


def _agree(accelerator, halt: bool) -> bool:
    """Every process must agree to stop on the same step."""
    if accelerator.num_processes == 1:
        return halt
    import torch

    flag = torch.tensor([1.0 if halt else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def _diverged(run_dir: Path, loss_value: float, step: int) -> LoraError:
    last = checkpoints.scan(run_dir, deep=False)
    kept = next((c.path.name for c in reversed(last) if c.complete), "none")
    return LoraError(
        f"the loss became {loss_value} at step {step}; stopped (last good checkpoint: {kept})",
        "lower train.learning_rate (e.g. halve it), use mixed_precision = \"bf16\" or \"no\", "
        "or set train.max_grad_norm = 1.0; then `lora resume` this run")


def _guard_write(s: Setup, what: str, write, *args):
    """A write error (disk full, read-only) as a LoraError naming what to free."""
    try:
        return write(*args)
    except OSError as e:
        raise checkpoints.write_error(e, what, s.run_dir, 16 << 20, s.run_dir) from None


def _checkpoint(s: Setup, step: int, loss_value: float, log: metrics.Log) -> Path:
    """Save everything resume needs at `step`, then redraw loss.png from the metrics so far."""
    t, accum, task = s.profile.train, s.profile.train.gradient_accumulation, s.task
    facts = {"epoch": int(step * accum // task.batches_per_epoch), "max_steps": s.max_steps,
             "micro_batches": step * accum, "seed": t.seed, "loss": loss_value,
             "loss_smooth": log.smooth, "elapsed": log.elapsed(),
             "processes": s.accelerator.num_processes, "global_batch": task.global_batch,
             "batches_per_epoch": task.batches_per_epoch, "lora_version": __version__}
    evaluate = getattr(task, "evaluate", None)  # optional in the task protocol
    if evaluate is not None:
        facts["eval"] = s.result.eval = evaluate()
    trainer = {"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
               "rng": statefiles.rng_states()}
    path = checkpoints.save(s.run_dir, step, task.adapter_state(), trainer, facts,
                            t.keep_checkpoints)
    _guard_write(s, "loss.png", s.plotter.redraw)  # drawn while the next steps train
    return path
