"""How `lora` hashes a file: sha256 of its bytes, read in chunks, as a hex string.

The one definition: checkpoints record it for every file they hold (`state.json` "files"), and
mirrors publish it for every file they serve. Hashing bytes already in memory is `hashlib`'s job.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def digest_file(path: Path, h, chunk: int = CHUNK) -> str:
    """Feed the file to a hashlib object `h` (sha256, or git's "blob N\\0"-prefixed sha1)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    return digest_file(path, hashlib.sha256(), chunk)
