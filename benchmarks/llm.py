"""LLM LoRA training speed and peak memory: our causal-LM step against TRL's SFTTrainer.

    .venv/bin/python benchmarks/llm.py                       # CPU, "small" Llama, one run each
    .venv/bin/python benchmarks/llm.py --size tiny --examples 64
    .venv/bin/python benchmarks/llm.py --quantize 4bit       # QLoRA on both sides (GPU or CPU)
    .venv/bin/python benchmarks/llm.py --size 0.5b --arch qwen2 [--quantize 4bit]  # on a GPU

Our side is `lora train` itself (`runs.start` + `training.run`, the step times of its metrics,
leaving out setup and the final checkpoint). Both sides train the same model (built from a config by `loracli.llm.tinyllm`, random weights),
on the same chat records, with the same settings: LoRA r 8, alpha 16, dropout 0.1 on
q_proj/v_proj, AdamW lr 2e-4 constant, batch 8, one epoch, max length 256, loss on the answers
only, no packing. Ours groups batches by length (its default); TRL runs twice, with its default
random batches and with `train_sampling_strategy="group_by_length"`. Without TRL installed only
our side runs.

Each side runs in its own process, so the peak memory (CUDA allocator peak on a GPU, peak RSS on
the CPU) is its own. Tokens/s counts the real (unpadded) tokens of every example trained on,
divided by the wall time of the training steps alone (model loading and data preparation are
left out on both sides); tokens per CPU-second divides by the process's CPU time over the same
span instead, which a machine shared with other work disturbs far less (run with
OMP_NUM_THREADS=1 for it to mean compute). Prints a table and one JSON line per side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the model answers questions about contracts patients symptoms clauses and colours "
         "it stops at the end of its turn and speaks briefly politely like a pirate").split()


def records(n: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def sentence(lo, hi):
        return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))).capitalize() + "."

    return [{"messages": [{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": sentence(8, 40)},
                          {"role": "assistant", "content": sentence(10, 120)}]}
            for _ in range(n)]


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_ours(args, model_dir: Path, data: Path, work: Path) -> dict:
    """`lora train`'s own code path (runs.start + training.run) on the same model and data."""
    import math

    import torch

    from loracli import profiles
    from loracli.llm import causal
    from loracli.llm import data as llm_data
    from loracli.llm import templates
    from loracli.training import loop as training
    from loracli.training import runs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = causal.load_tokenizer(model_dir)
    encoded = templates.Encoder(tokenizer, templates.resolve(tokenizer), 256).encode_all(
        llm_data.load(data))
    steps = math.ceil(len(encoded) / args.batch)
    profile = profiles.parse({
        "model": {"base": str(model_dir), "quantize": args.quantize},
        "data": {"dir": str(data), "max_length": 256},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.1, "targets": ["q_proj", "v_proj"]},
        "train": {"max_steps": steps, "batch_size": args.batch, "learning_rate": 2e-4,
                  "scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "mixed_precision": "bf16" if device.type == "cuda" else "no",
                  "gradient_checkpointing": args.checkpointing, "seed": 42,
                  "save_steps": 10_000_000, "output_dir": str(work / "run")}}, name="bench")
    run_dir, _ = runs.start(profile)
    rows, cpu = [], {}

    def on_step(row):
        rows.append(row)
        cpu["end"] = time.process_time()

    result = training.run(run_dir, on_step=on_step,
                          on_start=lambda _info: cpu.setdefault("start", time.process_time()))
    seconds = sum(r["seconds"] for r in rows)
    cpu_seconds = cpu["end"] - cpu["start"]
    tokens = sum(len(e.ids) for e in encoded)
    return {"side": "lora train (training.run)", "steps": len(rows), "tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "cpu_seconds": round(cpu_seconds, 3),
            "tokens_per_cpu_s": round(tokens / cpu_seconds, 1),
            "peak_mib": round(peak_memory_mib(device), 1), "last_loss": round(result.loss, 4)}


def run_trl_grouped(args, model_dir: Path, data: Path, work: Path) -> dict:
    return run_trl(args, model_dir, data, work, group_by_length=True)


def run_trl(args, model_dir: Path, data: Path, work: Path, group_by_length: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {"dtype": torch.float32}
    if args.quantize:
        kwargs.update(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32),
            device_map={"": str(device)})
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    config = SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch,
                       num_train_epochs=1, learning_rate=2e-4, lr_scheduler_type="constant",
                       weight_decay=0.0, max_length=256, assistant_only_loss=True, packing=False,
                       logging_steps=10_000, save_strategy="no", report_to=[], seed=42,
                       use_cpu=device.type == "cpu", bf16=device.type == "cuda",
                       dataloader_num_workers=0, gradient_checkpointing=args.checkpointing,
                       max_grad_norm=1.0, disable_tqdm=True,
                       train_sampling_strategy="group_by_length" if group_by_length else "random")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    start, cpu_start = time.perf_counter(), time.process_time()
    out = trainer.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    grouped = ", group_by_length" if group_by_length else ""
    return {"side": f"TRL SFTTrainer {__import__('trl').__version__}{grouped}",
            "steps": out.global_step, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "cpu_seconds": round(cpu_seconds, 3),
            "tokens_per_cpu_s": round(tokens / cpu_seconds, 1),
            "peak_mib": round(peak_memory_mib(device), 1),
            "last_loss": round(float(out.training_loss), 4)}


def child(args) -> None:
    work = Path(args.work)
    fn = {"ours": run_ours, "trl": run_trl, "trl-grouped": run_trl_grouped}[args.side]
    print("RESULT " + json.dumps(fn(args, work / "model", work / "data.jsonl", work)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small", "0.5b"),
                        help="model shape; 0.5b (Qwen2.5-0.5B's shape, random weights): a GPU")
    parser.add_argument("--arch", default="llama", choices=("llama", "qwen2"))
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quantize", default="", choices=("", "4bit"))
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)

    from loracli.llm import tinyllm

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tinyllm.build(work / "model", args.arch, size=args.size)
        (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                 for r in records(args.examples)))
        try:
            import trl  # noqa: F401
            sides = ["ours", "trl", "trl-grouped"]
        except ImportError:
            print("TRL is not installed: pip install trl for the reference side", file=sys.stderr)
            sides = ["ours"]
        results = []
        for side in sides:
            cmd = [sys.executable, __file__, "--side", side, "--work", str(work),
                   "--batch", str(args.batch), "--quantize", args.quantize]
            if args.checkpointing:
                cmd.append("--checkpointing")
            env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{side} failed")
            results.append(json.loads(line[7:]))
    print(f"model: tiny-llm {args.arch} {args.size}, {args.examples} examples, batch "
          f"{args.batch}, quantize {args.quantize or 'no'}, checkpointing {args.checkpointing}")
    print(f"{'side':42} {'steps':>5} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} "
          f"{'tok/CPU-s':>9} {'peak MiB':>9}")
    for r in results:
        print(f"{r['side']:42} {r['steps']:>5} {r['tokens']:>7} {r['seconds']:>8} "
              f"{r['tokens_per_s']:>9} {r['tokens_per_cpu_s']:>9} {r['peak_mib']:>9}")
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
