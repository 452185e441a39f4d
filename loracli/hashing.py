"""How `lora` hashes a file: sha256 of its bytes, read in chunks, as a hex string.

The one definition: checkpoints record it for every file they hold (`state.json` "files"), and
mirrors publish it for every file they serve. Hashing bytes already in memory is `hashlib`'s job.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
