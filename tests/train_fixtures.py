"""Helpers for the training and resume tests: a learnable synthetic dataset, profiles, a network
guard and subprocess runs of the real `lora` command."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw


def make_dataset(folder: Path, n: int = 6, seed: int = 0) -> Path:
    """A learnable concept: a red square on a blue background, 64 px, captioned tags."""
    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (64, 64), (20, 40, 200))
        x, y = rnd.randint(0, 32), rnd.randint(0, 32)
        ImageDraw.Draw(im).rectangle([x, y, x + 24, y + 24], fill=(230, 30, 30))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("sks, red square, blue background", "utf-8")
    return folder


def write_profile(path: Path, base_model, data_dir: Path, out_dir: Path, **sections) -> Path:
    """A profile TOML: tiny defaults for the tests, `sections={"train": {...}}` override them."""
    merged = {
        "model": {"base": str(base_model)},
        "data": {"dir": str(data_dir), "resolution": 64},
        "lora": {"rank": 4, "alpha": 4, "dropout": 0.0},
        "train": {"max_steps": 4, "batch_size": 2, "save_steps": 2, "learning_rate": 1e-3,
                  "mixed_precision": "no", "output_dir": str(out_dir)},
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    import tomli_w

    path.write_text(tomli_w.dumps(merged), "utf-8")
    return path


class NetworkGuard:
    """Refuses (and records) every connection that is not to loopback or a Unix socket."""

    def __init__(self):
        self.attempts: list = []

    def _check(self, address):
        if isinstance(address, (str, bytes)):
            return  # AF_UNIX
        host = address[0]
        try:
            if ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            if host == "localhost":
                return
        self.attempts.append(address)
        raise OSError(f"network guard: connection to {address} refused in a test")

    @contextlib.contextmanager
    def active(self):
        real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
        guard = self

        def connect(sock, address):
            guard._check(address)
            return real_connect(sock, address)

        def connect_ex(sock, address):
            guard._check(address)
            return real_connect_ex(sock, address)

        socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
        try:
            yield self
        finally:
            socket.socket.connect, socket.socket.connect_ex = real_connect, real_connect_ex


def lora_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "loracli", *map(str, args)]


def env(**extra) -> dict:
    out = dict(os.environ)
    out.update({k: str(v) for k, v in extra.items()})
    return out


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.01)
    return False


def metrics_steps(run_dir: Path) -> list[int]:
    import json

    path = run_dir / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text("utf-8").splitlines():
        with contextlib.suppress(ValueError):
            steps.append(json.loads(line)["step"])
    return steps


def adapter_tensors(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{c.name}/{k}": v for c in sorted(ckpt.iterdir()) if c.is_dir()
            for k, v in load_file(str(c / "adapter_model.safetensors")).items()}


def to_single_file(folder: Path, dest: Path) -> Path:
    """Write an SD1-style single-file (original LDM key layout) checkpoint of a diffusers folder.

    The inverse of diffusers' single-file conversion, for layers_per_block = 1 or 2 models, so
    the test can load it back with `from_single_file` like a user's `v1-5-pruned.safetensors`.
    """
    import json

    from safetensors.torch import load_file, save_file

    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    out = {}
    n = unet_cfg["layers_per_block"]
    levels = len(unet_cfg["block_out_channels"])
    unet_map = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for i in range(levels):
        for j in range(n):
            unet_map[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(n + 1) * i + j + 1}.0."
            unet_map[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(n + 1) * i + j + 1}.1."
        for j in range(n + 1):
            unet_map[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(n + 1) * i + j}.0."
            unet_map[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(n + 1) * i + j}.1."
        if i < levels - 1:
            unet_map[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(n + 1) * (i + 1)}.0.op."
            has_attn = "CrossAttn" in unet_cfg["up_block_types"][i]
            unet_map[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(n + 1) * i + n}.{2 if has_attn else 1}."
    unet_map["mid_block.attentions.0."] = "middle_block.1."
    for j in range(2):
        unet_map[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    resnet = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.",
              "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.",
              "conv_shortcut.": "skip_connection."}
    for key, value in load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")).items():
        new = key
        for a, b in sorted(unet_map.items(), key=lambda kv: -len(kv[0])):
            if new.startswith(a):
                new = b + new[len(a):]
                break
        if ".resnets." in key or "mid_block.resnets" in key:
            for a, b in resnet.items():
                new = new.replace(f".{a}", f".{b}")
        out["model.diffusion_model." + new] = value
    vn = vae_cfg["layers_per_block"]
    vae_levels = len(vae_cfg["block_out_channels"])
    vae_map = {"conv_norm_out.": "norm_out.", "mid_block.attentions.0.": "mid.attn_1."}
    for i in range(vae_levels):
        for j in range(vn):
            vae_map[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(vn + 1):
            vae_map[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{vae_levels - 1 - i}.block.{j}."
        if i < vae_levels - 1:
            vae_map[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            vae_map[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{vae_levels - 1 - i}.upsample."
    for j in range(2):
        vae_map[f"mid_block.resnets.{j}."] = f"mid.block_{j + 1}."
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    for key, value in load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")).items():
        new = key
        for a, b in sorted(vae_map.items(), key=lambda kv: -len(kv[0])):
            if a in new:
                new = new.replace(a, b)
        new = new.replace("conv_shortcut.", "nin_shortcut.")
        if "mid.attn_1." in new:
            for a, b in attn.items():
                new = new.replace(f"mid.attn_1.{a}", f"mid.attn_1.{b}")
            if value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    for key, value in load_file(str(folder / "text_encoder" / "model.safetensors")).items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    save_file({k: v.contiguous() for k, v in out.items()}, str(dest))
    return dest
