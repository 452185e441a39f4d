"""Tiny Llama and Qwen2 models with a ChatML byte-level BPE tokenizer, built offline.

No Python package ships an LLM vocabulary, so the tokenizer is trained in-process with
`tokenizers` on a fixed corpus (deterministic: same files on every machine). The chat template
marks assistant turns with `{% generation %}`, so transformers' own assistant mask works on it
and the tests can check our fallback masking against it. The weights are random (seeded); the
result is a normal transformers folder that `AutoModelForCausalLM`/`AutoTokenizer` load.
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("llama", "qwen2")
BUILD_VERSION = 1  # raise when what `build` writes changes
VOCAB_SIZE = 512
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CORPUS = """\
The quick brown fox jumps over the lazy dog. A user asks a question and the assistant answers it.
You are a helpful assistant. Answer briefly and politely. What is the capital of France? Paris.
What is two plus two? Four. Translate hello into French: bonjour. Name a colour: blue, red, green.
Write a haiku about the sea. The sea is calm tonight; waves whisper to the pale moon; salt on the wind.
Instruction: summarise the text below. Input: The meeting was moved to Tuesday at ten o'clock.
Output: The meeting is now on Tuesday at 10. System: you speak like a pirate. Arr, matey, aye aye!
def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000
Medical and legal assistants answer questions about symptoms, contracts, patients and clauses.
The model learns to stop at the end of its turn. Tokens, prompts, answers, labels and masks.
"""


def build_id() -> str:
    """Identifies what `build` writes with this version of lora (the cache rebuilds on change)."""
    return f"llm-{BUILD_VERSION}"


def train_tokenizer():
    """A `PreTrainedTokenizerFast` with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from loracli.llm.templates import CHATML

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML,
                                   model_max_length=2048)


SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocabulary (0: the tokenizer's)
    "tiny": (64, 128, 2, 4, 2, 0),         # the tests and the demo: trains in seconds on a CPU
    "small": (256, 688, 4, 8, 4, 0),       # CPU benchmarks: the step, not overhead, counts
    "0.5b": (896, 4864, 24, 14, 2, 151936),  # Qwen2.5-0.5B's shape (GPU benchmarks)
}


def config(arch: str, vocab_size: int, tokenizer=None, size: str = "tiny"):
    from transformers import LlamaConfig, Qwen2Config

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; one of {ARCHS}")
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    ids = {}
    if tokenizer is not None:
        ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
               "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    hidden, intermediate, layers, heads, kv, vocab = SIZES[size]
    return cls(vocab_size=max(vocab, vocab_size), hidden_size=hidden,
               intermediate_size=intermediate,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
               max_position_embeddings=2048, tie_word_embeddings=False, **ids)


def build(dest: Path, arch: str = "llama", seed: int = 0, size: str = "tiny") -> Path:
    """Write a tiny `arch` causal LM (config, safetensors, tokenizer, template) into `dest`."""
    import torch
    import transformers.utils.logging
    from transformers import AutoModelForCausalLM, GenerationConfig

    transformers.utils.logging.disable_progress_bar()

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    cfg = config(arch, len(tokenizer), tokenizer, size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


if __name__ == "__main__":  # pragma: no cover - python -m loracli.llm.tinyllm DEST [ARCH]
    import sys

    print(build(Path(sys.argv[1]), *(sys.argv[2:3] or ["llama"])))
