"""The profile schema: frozen dataclasses, parsed strictly, every problem reported at once.

Each key is a dataclass field whose metadata holds its doc, bounds and choices; `parse` checks a
plain mapping against them and raises `ProfileError` listing every problem with its dotted key
and, for a misspelt key, the key that was probably meant. `--set SECTION.KEY=VALUE` overrides are
checked against the same fields (`profiles.check_overrides`). Reading files, finding profiles by
name and applying overrides is `loracli.profiles`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from loracli.errors import LoraError
from loracli.families.sd import SD1  # the default base (sd15) is SD1: its targets are the defaults


def _f(default, doc: str, *, min=None, max=None, choices=None, min_exclusive=False):
    meta = {"doc": doc, "min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def _family_choices() -> tuple[str, ...]:
    from loracli import families  # the registry: a family registered later is a valid value

    return ("auto", *families.names())


@dataclass(frozen=True)
class ModelSection:
    base: str = _f("sd15", "alias (sd15, sd21, sdxl, tiny-sd), org/name[@revision], a diffusers "
                           "folder, or a single-file .safetensors checkpoint")
    vae: str = _f("", "optional VAE override (alias, repo id or folder), e.g. stabilityai/sd-vae-ft-mse")
    family: str = _f("auto", "model family; auto detects it from the model",
                     choices=_family_choices)
    prediction_type: str = _f("auto", "noise target; auto reads the model's scheduler "
                                      "(SD2 768 models use v_prediction)",
                              choices=("auto", "epsilon", "v_prediction"))
    quantize: str = _f("", "\"4bit\": the base in 4-bit NF4 through bitsandbytes, CUDA only "
                           "(language models: QLoRA, double quant; FLUX/SD3.5: the transformer); "
                           "\"fp8\": FLUX/SD3.5 transformer weights stored in float8, cast up "
                           "per layer; \"\" keeps full precision", choices=("", "4bit", "fp8"))


@dataclass(frozen=True)
class DataSection:
    dir: str = _f("./data/style_train", "folder of training images (kohya repeat folders "
                                        "like 10_name are understood)")
    caption_ext: str = _f(".txt", "caption file extension beside each image; metadata.csv wins "
                                  "when present")
    resolution: int = _f(512, "training resolution in pixels (longest bucket side area)",
                         min=64, max=4096)
    bucketing: bool = _f(True, "aspect-ratio buckets, so wide and tall images are not cropped square")
    bucket_step: int = _f(64, "bucket side granularity in pixels", min=8, max=512)
    repeats: int = _f(1, "how often each image is seen per epoch (multiplies a folder's 10_ prefix)",
                      min=1, max=10000)
    trigger: str = _f("", "trigger word put first in every caption; the caption of images without one")
    shuffle_captions: bool = _f(False, "shuffle comma-separated tags each step (tag-style captions)")
    keep_tokens: int = _f(0, "leading tags kept in place when shuffling", min=0, max=75)
    caption_dropout: float = _f(0.0, "probability of training on an empty caption", min=0.0, max=1.0)
    flip: bool = _f(False, "random horizontal flips (off for asymmetric characters or text)")
    crop: str = _f("center", "how images are cropped to their bucket", choices=("center", "random"))
    format: str = _f("auto", "language models: record shape of the .jsonl/.json data; auto detects "
                             "chat (messages, ShareGPT conversations), instruction (alpaca) or text",
                     choices=("auto", "chat", "instruction", "text"))
    max_length: int = _f(1024, "language models: tokens per example; longer ones are cut, raw text "
                               "is split", min=16, max=131072)
    packing: bool = _f(False, "language models: lay short examples end to end in one row (they "
                              "never attend to each other)")
    group_by_length: bool = _f(True, "language models: batch examples of similar length (less "
                                     "padding, faster)")
    train_on_prompt: bool = _f(False, "language models: also learn the prompt tokens; by default "
                                      "only the assistant's answers")
    eval_split: float = _f(0.0, "language models: share of the examples held out for loss and "
                                "perplexity at checkpoints", min=0.0, max=0.5)
    template: str = _f("", "language models: chat template; \"\" is the tokenizer's own, "
                           "\"chatml\", or a .jinja file")


@dataclass(frozen=True)
class LoraSection:
    rank: int = _f(8, "LoRA rank (dim); raise to 12-16 when a style is not picked up",
                   min=1, max=1024)
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha/rank", min=0.0,
                      min_exclusive=True, max=4096.0)
    dropout: float = _f(0.1, "dropout inside the LoRA layers", min=0.0, max=0.9)
    targets: tuple = _f(list(SD1.unet_targets), "UNet modules that get a LoRA")
    train_text_encoder: bool = _f(False, "also train the text encoder(s); helps characters, costs memory")
    text_encoder_targets: tuple = _f(list(SD1.text_targets),
                                     "text-encoder modules that get a LoRA")
    rslora: bool = _f(False, "rank-stabilised scaling alpha/sqrt(rank)")
    dora: bool = _f(False, "weight-decomposed LoRA (DoRA); slower, sometimes better")


@dataclass(frozen=True)
class TrainSection:
    max_steps: int = _f(1000, "optimizer steps to train; 0 means use epochs", min=0, max=10_000_000)
    epochs: int = _f(0, "passes over the data, used when max_steps is 0", min=0, max=100_000)
    batch_size: int = _f(4, "images per step per process; 1-2 on small GPUs", min=1, max=1024)
    gradient_accumulation: int = _f(1, "micro-batches per optimizer step (a larger effective batch)",
                                    min=1, max=1024)
    learning_rate: float = _f(2e-4, "UNet LoRA learning rate", min=0.0, min_exclusive=True, max=1.0)
    text_encoder_lr: float = _f(0.0, "text-encoder LoRA learning rate; 0 means learning_rate",
                                min=0.0, max=1.0)
    optimizer: str = _f("adamw", "adamw, or adamw8bit (bitsandbytes on CUDA)",
                        choices=("adamw", "adamw8bit"))
    weight_decay: float = _f(1e-2, "AdamW weight decay", min=0.0, max=1.0)
    scheduler: str = _f("cosine", "learning-rate schedule after warm-up",
                        choices=("constant", "cosine", "linear"))
    warmup_steps: int = _f(0, "steps of linear warm-up", min=0, max=1_000_000)
    max_grad_norm: float = _f(1.0, "gradient clipping; 0 turns it off", min=0.0, max=1e6)
    mixed_precision: str = _f("fp16", "fp16 or bf16 on a GPU (bf16 on Ampere and newer); the CPU "
                                      "always uses fp32", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _f(False, "trade ~30% speed for much less memory")
    cache_latents: bool = _f(True, "encode images with the VAE once and cache the latents on disk")
    cache_text: bool = _f(True, "encode captions once (frozen text encoder only)")
    noise_offset: float = _f(0.0, "noise offset (0.05-0.1 helps very dark/bright images)",
                             min=0.0, max=1.0)
    min_snr_gamma: float = _f(0.0, "min-SNR loss weighting (5 is common); 0 turns it off",
                              min=0.0, max=100.0)
    seed: int = _f(42, "random seed; the same seed and data give the same LoRA", min=0, max=2**32 - 1)
    save_steps: int = _f(100, "write a checkpoint every N steps", min=1, max=10_000_000)
    keep_checkpoints: int = _f(3, "newest checkpoints kept on disk", min=1, max=1000)
    log_with: str = _f("", "also log metrics to tensorboard (files under the run's logs/) or "
                       "wandb; empty: metrics.jsonl and loss.png only",
                       choices=("", "tensorboard", "wandb"))
    processes: int = _f(1, "training processes (GPUs) launched through accelerate; on several "
                           "machines, per machine", min=1, max=64)
    num_machines: int = _f(1, "machines training together, each running the same command "
                              "(accelerate's num_machines)", min=1, max=1024)
    machine_rank: int = _f(0, "this machine's rank, 0 to num_machines - 1; machine 0 writes the "
                              "run", min=0, max=1023)
    main_process_ip: str = _f("", "address of machine 0, reachable from every machine "
                                  "(several machines)")
    main_process_port: int = _f(0, "port on machine 0 where the machines meet; 0 means a free "
                                   "port on one machine, 29500 on several", min=0, max=65535)
    accelerate_config: str = _f("", "an accelerate config file; empty means accelerate's default "
                                    "one, when it exists (its values fill keys left at default)")
    output_dir: str = _f("./output/{profile}", "run folder; {profile} is the profile's name")


@dataclass(frozen=True)
class SampleSection:
    prompts: tuple = _f([], "prompts rendered at checkpoints")
    every_steps: int = _f(0, "render samples every N steps; 0 turns samples off", min=0,
                          max=10_000_000)
    steps: int = _f(20, "inference steps per sample", min=1, max=200)
    guidance: float = _f(7.0, "classifier-free guidance scale", min=0.0, max=50.0)
    seed: int = _f(1234, "seed for sample images", min=0, max=2**32 - 1)
    max_new_tokens: int = _f(64, "language models: tokens of each sample answer", min=1, max=4096)


@dataclass(frozen=True)
class Profile:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    name: str = field(default="default", compare=False)

    def to_dict(self) -> dict:
        out = {}
        for section in SECTIONS:
            values = dataclasses.asdict(getattr(self, section))
            out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return out

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def replace(self, **sections) -> "Profile":
        return dataclasses.replace(self, **sections)


SECTIONS: dict[str, type] = {
    "model": ModelSection, "data": DataSection, "lora": LoraSection,
    "train": TrainSection, "sample": SampleSection,
}


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def key_docs() -> list[dict]:
    """Every key with its default and what it does (README table, `profile show --keys`)."""
    rows = []
    for s, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else list(f.default_factory())
            rows.append({"key": f"{s}.{f.name}", "default": default, "doc": f.metadata["doc"]})
    return rows


class ProfileError(LoraError):
    """All problems of one profile, each `dotted.key: what is wrong`."""

    def __init__(self, source: str, problems: list[str], hint: str | None = None):
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''} in profile",
                         hint or "fix the keys above; `lora profile show default` lists every key",
                         details=problems)
        self.problems = problems




def suggest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def check_value(key: str, f: dataclasses.Field, value, problems: list[str]):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    meta = f.metadata
    expected = type(default)
    if expected is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            problems.append(f"{key}: expected a list of strings, got {_type_name(value)} {value!r}")
            return None
        return tuple(value)
    if expected is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {_type_name(value)} {value!r}")
            return None
    elif expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                problems.append(f"{key}: expected an integer, got {_type_name(value)} {value!r}")
                return None
    elif expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {_type_name(value)} {value!r}")
            return None
        value = float(value)
    elif expected is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {_type_name(value)} {value!r}")
            return None
    choices = meta.get("choices")
    choices = choices() if callable(choices) else choices
    if choices and value not in choices:
        problems.append(f"{key}: {value!r} is not one of {', '.join(choices)}"
                        + suggest(str(value), list(choices)))
        return None
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        bound = f"greater than {lo}" if meta.get("min_exclusive") else f"at least {lo}"
        problems.append(f"{key}: {value!r} is out of range; must be {bound}")
        return None
    if hi is not None and value > hi:
        problems.append(f"{key}: {value!r} is out of range; must be at most {hi}")
        return None
    return value


def parse(data: dict, name: str = "profile", source: str | None = None) -> Profile:
    """Validate a profile mapping; raise `ProfileError` listing every problem at once."""
    problems: list[str] = []
    sections = {}
    keys = all_keys()
    for section, value in data.items():
        if section in SECTIONS or section == "name":
            continue
        if isinstance(value, dict):
            problems.append(f"[{section}]: unknown section" + suggest(section, list(SECTIONS)))
        else:
            leaf = {k.split(".")[1]: k for k in keys}
            match = difflib.get_close_matches(section, list(leaf), n=1, cutoff=0.6)
            problems.append(f"{section}: keys belong in a section"
                            + (f"; did you mean {leaf[match[0]]}?" if match else ", e.g. [train]"))
    for section, cls in SECTIONS.items():
        raw = data.get(section, {})
        if not isinstance(raw, dict):
            problems.append(f"{section}: expected a table ([{section}]), got {_type_name(raw)}")
            sections[section] = cls()
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in raw.items():
            dotted = f"{section}.{key}"
            if key not in fields:
                problems.append(f"{dotted}: unknown key" + suggest(dotted, keys))
                continue
            checked = check_value(dotted, fields[key], value, problems)
            if checked is not None:
                values[key] = checked
        sections[section] = cls(**values)
    profile = Profile(**sections, name=name)
    _check_combinations(profile, problems)
    if problems:
        raise ProfileError(source or name, problems)
    return profile


def _check_combinations(p: Profile, problems: list[str]) -> None:
    if p.train.max_steps == 0 and p.train.epochs == 0:
        problems.append("train.max_steps: set max_steps or epochs above 0")
    if p.data.resolution % 8:
        problems.append(f"data.resolution: {p.data.resolution} must be a multiple of 8")
    if not p.lora.targets:
        problems.append("lora.targets: name at least one module, e.g. [\"to_q\", \"to_v\"]")
    if p.sample.every_steps and not p.sample.prompts:
        problems.append("sample.prompts: sample.every_steps is set but there are no prompts")
    if p.data.caption_ext and not p.data.caption_ext.startswith("."):
        problems.append(f"data.caption_ext: {p.data.caption_ext!r} must start with a dot, "
                        f"e.g. \".{p.data.caption_ext}\"")

