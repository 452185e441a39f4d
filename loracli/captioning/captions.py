"""Captions from CLIP alone: label banks ranked per category, assembled into one caption per image.

A label bank (`loracli.captioning.banks`) is a TOML file of categories (medium, subject, style, lighting,
colour, …). Each label is encoded with a few prompt templates, averaged and normalised (`loracli.captioning.clipmodel` does
that and caches the result); here, everything is a pure function over those embeddings:

* a single-answer category names its best label when that label's probability among the
  category's labels (softmax at the model's own logit scale) reaches `threshold`;
* a multi-label category names up to `top_k` labels that beat a neutral baseline prompt
  (`neutral`, e.g. "an image") by `margin`.

The caption is the prefix (trigger word) first, then the tags in bank order, cut at CLIP's
77 tokens (75 between the start and end tokens).

Nothing here reads or writes a file or loads a model: `loracli.captioning.files` knows the files
(caption files, metadata.csv) and `loracli.captioning.job` runs the job over a folder.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from loracli.captioning.banks import Bank, Category
from loracli.errors import LoraError

MAX_TOKENS = 75  # CLIP's 77 minus the start and end tokens


@dataclass(frozen=True)
class Tag:
    category: str
    label: str
    score: float  # single: probability among the category's labels; multi: cosine over baseline


# --- ranking (pure, over unit-length embeddings) ---------------------------------------------

def label_texts(category: Category) -> list[str]:
    """Every prompt a category needs encoded: each label under each template, then the neutral."""
    return [t.format(label) for label in (*category.labels, category.neutral)
            for t in category.templates]


def average_templates(text_embs, category: Category):
    """(labels + neutral) x templates rows → one unit vector per label, and the neutral one."""
    import numpy as np

    n_t = len(category.templates)
    e = np.asarray(text_embs, dtype=np.float32).reshape(len(category.labels) + 1, n_t, -1)
    e = e.mean(axis=1)
    e /= np.linalg.norm(e, axis=1, keepdims=True).clip(min=1e-12)
    return e[:-1], e[-1]


def rank(image_embs, category: Category, label_embs, neutral_emb,
         logit_scale: float = 100.0) -> list[list[Tag]]:
    """The tags a category gives each image (rows of `image_embs`, unit length)."""
    import numpy as np

    img = np.asarray(image_embs, dtype=np.float32)
    sims = img @ np.asarray(label_embs, dtype=np.float32).T  # [images, labels]
    out: list[list[Tag]] = []
    if not category.multi:
        logits = logit_scale * sims
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        for row in probs:
            best = int(row.argmax())
            ok = row[best] >= category.threshold
            out.append([Tag(category.name, category.labels[best], float(row[best]))] if ok else [])
        return out
    baseline = img @ np.asarray(neutral_emb, dtype=np.float32)  # [images]
    gain = sims - baseline[:, None]
    for row in gain:
        order = np.argsort(-row, kind="stable")[: category.top_k]
        out.append([Tag(category.name, category.labels[j], float(row[j]))
                    for j in order if row[j] > category.margin])
    return out


def rank_bank(image_embs, bank: Bank, embeddings: dict, logit_scale: float) -> list[list[Tag]]:
    """Tags for each image over every category of `bank`, in bank order.

    `embeddings` maps a category name to its (label_embs, neutral_emb).
    """
    per_image: list[list[Tag]] = [[] for _ in range(len(image_embs))]
    for cat in bank.categories:
        label_embs, neutral = embeddings[cat.name]
        for tags, found in zip(per_image, rank(image_embs, cat, label_embs, neutral, logit_scale)):
            tags.extend(found)
    return per_image


# --- caption text ----------------------------------------------------------------------------

def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def assemble(prefix: str, tags: Iterable[str], count_tokens: Callable[[str], int],
             existing: str = "", max_tokens: int = MAX_TOKENS) -> str:
    """`prefix, existing…, tags…` without repeats, dropping trailing new tags past `max_tokens`.

    The prefix and an existing caption (`--existing append`) are never cut; the tags come in
    priority (bank) order, so the least important go first.
    """
    head = split_tags(existing)
    prefix = prefix.strip()
    if prefix and (not head or head[0] != prefix):
        head = [prefix, *(t for t in head if t != prefix)]
    parts = list(head)
    seen = {t.lower() for t in parts}
    for tag in tags:
        if tag.lower() in seen:
            continue
        candidate = ", ".join([*parts, tag])
        if count_tokens(candidate) > max_tokens:
            continue  # a shorter tag further down may still fit
        parts.append(tag)
        seen.add(tag.lower())
    return ", ".join(parts)


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How many captions hold each tag, most frequent first (ties alphabetical)."""
    counts = Counter(tag for text in captions for tag in dict.fromkeys(split_tags(text)))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def clip_token_counter() -> Callable[[str], int]:
    """Tokens a caption costs in Stable Diffusion's CLIP text encoder (start/end excluded)."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    return lambda text: len(tokenizer.encode(text))


def check_prefix(prefix: str, count_tokens: Callable[[str], int]) -> None:
    n = count_tokens(prefix.strip()) if prefix.strip() else 0
    if n > MAX_TOKENS:
        raise LoraError(f"--prefix is {n} CLIP tokens; a caption holds at most {MAX_TOKENS}",
                        "use a shorter trigger, e.g. --prefix \"sks style\"")


def batches(items: Sequence, size: int) -> Iterable[Sequence]:
    size = max(1, int(size))
    for i in range(math.ceil(len(items) / size)):
        yield items[i * size:(i + 1) * size]
