"""On-disk caches of VAE latents and text embeddings, keyed by content.

A key is the sha256 of everything the tensor depends on: the model's identity (its config and
weight files' names, sizes and mtimes), the image bytes, the bucket, crop and flip — or the
caption. A changed image, model or setting is a different key, so a stale entry is never used.
Entries are safetensors written atomically; a half-written one cannot exist.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loracli import atomic, hashing


def model_fingerprint(folder: Path, components: tuple[str, ...]) -> str:
    """Identity of a model's components: configs plus weight files' names, sizes and mtimes."""
    h = hashlib.sha256()
    folder = Path(folder)
    if folder.is_file():
        st = folder.stat()
        h.update(f"{folder.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()
    for name in components:
        sub = folder / name
        if not sub.is_dir():
            continue
        for f in sorted(sub.iterdir()):
            if f.suffix == ".json":
                h.update(f.read_bytes())
            elif f.is_file():
                st = f.stat()
                h.update(f"{name}/{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _file_digest(path: Path, memo: dict) -> str:
    key = str(path)
    if key not in memo:
        memo[key] = hashing.sha256_file(Path(path))
    return memo[key]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _read(path: Path):
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - an unreadable entry is recomputed
        return None


def _write(path: Path, tensors: dict) -> None:
    from safetensors.torch import save

    atomic.write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


class LatentCache:
    """VAE latents (the posterior mean, before the scaling factor) per (image, bucket, flip)."""

    def __init__(self, root: Path, vae_key: str):
        self.root = Path(root) / "latents"
        self.vae_key = vae_key
        self._digests: dict = {}
        self.hits = self.misses = 0

    def key(self, sample, flip: bool) -> str:
        return _key("latent", self.vae_key, _file_digest(sample.example.path, self._digests),
                    list(sample.bucket), "center", bool(flip))

    def get(self, sample, flip: bool, encode):
        """The cached latent, or `encode(sample, flip)` stored and returned."""
        path = self.root / f"{self.key(sample, flip)}.safetensors"
        found = _read(path) if path.is_file() else None
        if found is not None:
            self.hits += 1
            return found["latent"]
        self.misses += 1
        latent = encode(sample, flip)
        _write(path, {"latent": latent})
        return _read(path)["latent"]  # the bits every later run will read


class TextCache:
    """Text-encoder outputs per caption (frozen encoders only)."""

    def __init__(self, root: Path, text_key: str):
        self.root = Path(root) / "text"
        self.text_key = text_key
        self.hits = self.misses = 0

    def get(self, caption: str, encode) -> dict:
        path = self.root / f"{_key('text', self.text_key, caption)}.safetensors"
        found = _read(path) if path.is_file() else None
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        _write(path, {k: v[0] for k, v in encode([caption]).items()})
        return _read(path)
