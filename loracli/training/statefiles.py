"""Trainer state (optimizer, scheduler, RNG) as a JSON structure plus safetensors: never pickle.

`rng_states()` captures every global RNG a step might draw from; `set_rng_states` restores it.

`encode(obj)` splits a nested state (what `optimizer.state_dict()`, `scheduler.state_dict()` or
the RNG getters return) into a JSON-able structure and a flat `{name: tensor}` dict; `decode`
puts it back together, value for value and bit for bit. Reading one runs no code from the file:
JSON gives only numbers, strings, lists and dicts, safetensors gives only tensors.

JSON has no tuples, int keys, arrays or NaN, so those are written as small tagged objects:

    {"__tensor__": "state.3.exp_avg"}        a tensor, stored under that name in the .safetensors
    {"__ndarray__": "numpy.1", "dtype": "<u4"} a numpy array (numpy's RNG key), stored as int64
    {"__tuple__": [...]}                     a tuple (python's RNG state, Adam's betas)
    {"__dict__": [[key, value], ...]}        a dict whose keys are not all plain strings
    {"__float__": "nan"}                     a float JSON cannot spell (nan, inf, -inf)
"""

from __future__ import annotations

import json
import math

TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__")


def encode(obj) -> tuple[object, dict]:
    """(JSON-able structure, {name: CPU tensor}) for `obj`; TypeError on anything else."""
    import numpy as np
    import torch

    tensors: dict = {}

    def put(tensor, path: str) -> str:
        name = path or "."
        while name in tensors:  # keys 1 and "1" in one dict
            name += "'"
        tensors[name] = tensor.detach().to("cpu").contiguous()
        return name

    def walk(x, path: str):
        if isinstance(x, torch.Tensor):
            return {"__tensor__": put(x, path)}
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "iub":
                raise TypeError(f"cannot store a numpy array of {x.dtype} in a checkpoint")
            return {"__ndarray__": put(torch.from_numpy(x.astype(np.int64)), path),
                    "dtype": x.dtype.str}
        if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, np.generic):
            return walk(x.item(), path)
        if isinstance(x, (tuple, list)):
            items = [walk(v, f"{path}.{i}".lstrip(".")) for i, v in enumerate(x)]
            return {"__tuple__": items} if isinstance(x, tuple) else items
        if isinstance(x, dict):
            items = {k: walk(v, f"{path}.{k}".lstrip(".")) for k, v in x.items()}
            if all(isinstance(k, str) for k in x) and not any(k in TAGS for k in x):
                return items
            return {"__dict__": [[walk(k, path), v] for k, v in items.items()]}
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint")

    return walk(obj, ""), tensors


def decode(structure, tensors: dict):
    """The object `encode` split into (structure, tensors)."""
    import numpy as np

    def walk(x):
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__ndarray__" in x:
            return tensors[x["__ndarray__"]].numpy().astype(np.dtype(x["dtype"]))
        if "__tuple__" in x:
            return tuple(walk(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {_key(walk(k)): walk(v) for k, v in x["__dict__"]}
        if "__float__" in x:
            return float(x["__float__"])
        return {k: walk(v) for k, v in x.items()}

    return walk(structure)


def _key(k):
    return tuple(k) if isinstance(k, list) else k  # a decoded key must stay hashable


def to_bytes(obj) -> tuple[bytes, bytes | None]:
    """(JSON bytes, safetensors bytes or None when `obj` holds no tensor)."""
    from safetensors.torch import save

    structure, tensors = encode(obj)
    text = json.dumps(structure, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")
    return text, (save(tensors, metadata={"format": "pt"}) if tensors else None)


def from_bytes(text: bytes, blob: bytes | None):
    from safetensors.torch import load

    return decode(json.loads(text.decode("utf-8")), load(blob) if blob else {})


def rng_states() -> dict:
    """Every global RNG a step might draw from, as tensors, arrays and numbers."""
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
