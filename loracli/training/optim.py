"""The optimizer and learning-rate schedule a profile's `[train]` section asks for.

    optimizer = "adamw" | "adamw8bit"   torch's AdamW (fused on CUDA) or bitsandbytes' 8-bit AdamW
    scheduler = "constant" | "cosine" | "linear", after `warmup_steps` of linear warm-up
"""

from __future__ import annotations

from loracli.errors import LoraError


def make_optimizer(t, groups: list[dict], cuda: bool):
    """AdamW over the task's parameter groups (each with its own learning rate)."""
    import torch

    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is None or not cuda:
            raise LoraError("optimizer adamw8bit needs bitsandbytes and a CUDA GPU",
                            "pip install bitsandbytes (on a CUDA machine), or --set "
                            "train.optimizer=adamw")
        return bnb.optim.AdamW8bit(groups, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=cuda or None)


def make_scheduler(t, optimizer, max_steps: int):
    """diffusers' schedule of that name; "constant" with warm-up is "constant_with_warmup"."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if t.scheduler == "constant" and t.warmup_steps else t.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps,
                         num_training_steps=max_steps)
