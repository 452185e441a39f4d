"""The LLM half of `lora demo`: teach the tiny Llama to answer like a pirate, offline, in a minute.

Fetch (tiny-llama is built into the model cache, no network) → chat records whose answers all
follow one pattern → `lora train`'s own code path → export a peft adapter and a GGUF adapter →
the base's and the LoRA's answers to questions it never saw, and the held-out loss of both.
The base has random weights, so its answers are noise; the LoRA's are the pattern.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


QUESTIONS = ("What is the capital of France?", "Name a colour", "What is two plus two?",
             "Write a haiku about the sea", "Translate hello into French",
             "Summarise the meeting", "Who are you?", "What is a contract?")
HELD_OUT = ("Where is the ship?", "What time is it?", "Do you like the sea?")
STEPS = 60
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def answer(i: int) -> str:
    return f"Arr, matey! Aye aye {i % 5}."


def records(n: int = 24, questions=QUESTIONS, start: int = 0) -> list[dict]:
    """Chat records: a question, and an answer in the pirate pattern."""
    return [{"messages": [{"role": "user", "content": questions[i % len(questions)]},
                          {"role": "assistant", "content": answer(start + i)}]}
            for i in range(n)]


RESULT = "answers.json"  # written last: a demo folder without it is continued, not replaced


@dataclass
class DemoResult:
    folder: Path
    data: Path
    run: Path
    steps: int
    status: str = "finished"                      # or "interrupted" (Ctrl+C): run it again
    resumed_from: int | None = None
    peft: Path | None = None
    gguf: Path | None = None
    base_loss: float | None = None
    lora_loss: float | None = None
    answers: list = field(default_factory=list)   # [{"prompt", "base", "lora"}]

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def profile_data(data: Path, out: Path, steps: int) -> dict:
    return {"model": {"base": "tiny-llama"},
            "data": {"dir": str(data)},
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "targets": TARGETS},
            "train": {"max_steps": steps, "batch_size": 4, "learning_rate": 1e-2,
                      "scheduler": "constant", "mixed_precision": "no",
                      "save_steps": max(1, steps // 2), "output_dir": str(out)},
            "sample": {"prompts": list(HELD_OUT[:1]), "every_steps": max(1, steps // 2)}}


def compare(run_dir: Path, export_dir: Path, held_out: list[dict]) -> tuple[float, float, list]:
    """(held-out loss of the base, of the LoRA, answers of both to the held-out questions)."""
    from peft import PeftModel

    from loracli.llm import batches, causal, data, templates
    from loracli.llm.task import TEMPLATE_FILE, resolve_base

    base_folder = resolve_base("tiny-llama")
    tokenizer = causal.load_tokenizer(base_folder)
    template = (Path(run_dir) / TEMPLATE_FILE).read_text("utf-8")
    model = PeftModel.from_pretrained(causal.load_base(base_folder), str(export_dir))
    examples = [data.parse(r, f"held-out:{i}")[0] for i, r in enumerate(held_out)]
    encoded = templates.Encoder(tokenizer, template, 256).encode_all(examples)
    scores = causal.evaluate(model, batches.fixed(encoded, 4, tokenizer.pad_token_id),
                             base_too=True)
    stop = [templates.end_of_turn(tokenizer, template)[1]]
    lora = causal.generate(model, tokenizer, template, HELD_OUT, stop, 24)
    with model.disable_adapter():
        base = causal.generate(model, tokenizer, template, HELD_OUT, stop, 24)
    answers = [{"prompt": p, "base": b, "lora": a} for p, b, a in zip(HELD_OUT, base, lora)]
    return scores["base_eval_loss"], scores["eval_loss"], answers


def run(folder: Path, on_step: Callable[[dict], None] | None = None,
        on_stage: Callable[[str], None] | None = None,
        on_warning: Callable[[str], None] | None = None, stop=None,
        max_steps: int | None = None, on_start: Callable[[dict], None] | None = None,
        on_status: Callable[[str], None] | None = None) -> DemoResult:
    """The whole LLM demo in `folder`; returns where everything is. Never touches the network.

    Stopped by Ctrl+C it returns with status "interrupted"; run again on the same folder it
    continues its run from the last checkpoint."""
    from loracli import profiles
    from loracli.demo import start_or_continue
    from loracli.hub import models
    from loracli.llm import runexport
    from loracli.training import jobs

    stage = on_stage or (lambda _m: None)
    folder = Path(folder).resolve()
    stage("fetch: building tiny-llama into the model cache (offline, deterministic)")
    models.install_tiny("tiny-llama")
    data = folder / "data" / "pirate.jsonl"
    steps = max_steps or STEPS
    profile = profiles.parse(profile_data(data, folder / "run", steps), name="llm-demo")

    def write_data() -> None:
        data.parent.mkdir(parents=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in records()), "utf-8")
        stage(f"data: {len(records())} chat records in {data}; every answer sounds like a pirate")

    job = start_or_continue(folder, profile, write_data, on_warning, last=RESULT)
    run_dir, resumed = job.run_dir, job.resumed
    stage(f"train: continuing the demo's run from step {job.start_step}" if resumed else
          f"train: {steps} steps of LoRA rank 8 on tiny-llama")
    result = jobs.train(job, on_step=on_step, on_warning=on_warning, stop=stop,
                        on_start=on_start, on_status=on_status)
    done = DemoResult(folder, data, run_dir, result.step,
                      resumed_from=job.start_step if resumed else None)
    if result.status == "interrupted":
        done.status = "interrupted"
        return done
    stage("export: a peft adapter (transformers, vLLM) and a GGUF adapter (llama.cpp, Ollama)")
    done.peft = runexport.export(run_dir, "peft", dtype="fp32", force=True).path
    done.gguf = runexport.export(run_dir, "gguf", force=True).path
    held = [{"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": answer(i)}]}
            for i, q in enumerate(HELD_OUT)]
    done.base_loss, done.lora_loss, done.answers = compare(run_dir, done.peft, held)
    from loracli import atomic

    atomic.write_json(folder / RESULT, done.to_dict())
    return done
