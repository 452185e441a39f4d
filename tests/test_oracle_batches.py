"""Oracle: what `lora train` feeds the model over a whole run, against what each data option
means — run length under repeats, batch order per epoch, flips, keep_tokens, noise offset — and
the learning-rate schedule with warm-up.

One short run (3 pictures x 2 repeats x 3 epochs, batch 1) on the one-timestep base of
tests/oracle_reference.py. The reference identifies, for every image the UNet saw, which picture
(and which way round) its noisy latent was made from and which caption it was given, by encoding
every candidate itself with plain diffusers/transformers; the tests then check the rules.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from conftest import HERMETIC
from oracle_reference import Reference, UnetCalls, metrics, one_timestep_base, two_colour_image
from train_fixtures import write_profile

pytestmark = pytest.mark.slow

PICTURES = {"a": ((255, 0, 0), (0, 0, 255)), "b": ((0, 255, 0), (255, 255, 255)),
            "c": ((0, 0, 0), (255, 255, 0))}
TAGS = ("sks", "two colours", "left half", "right half")
REPEATS, EPOCHS, KEEP, OFFSET, WARMUP, LR = 2, 3, 1, 1.0, 4, 1e-3
PER_EPOCH = len(PICTURES) * REPEATS  # batch 1


@pytest.fixture(scope="module")
def run(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle-batches")
    base = one_timestep_base(tiny_sd, root / "sd1-t1")
    data = root / "data"
    data.mkdir()
    for name, (left, right) in PICTURES.items():
        two_colour_image(data / f"{name}.png", left, right)
        (data / f"{name}.txt").write_text(", ".join(TAGS), "utf-8")
    profile = write_profile(
        root / "batches.toml", base, data, root / "out",
        data={"repeats": REPEATS, "flip": True, "shuffle_captions": True, "keep_tokens": KEEP},
        lora={"rank": 4, "alpha": 4, "dropout": 0.0},
        train={"max_steps": 0, "epochs": EPOCHS, "batch_size": 1, "learning_rate": LR,
               "scheduler": "cosine", "warmup_steps": WARMUP, "noise_offset": OFFSET,
               "save_steps": 1000, "cache_latents": True, "seed": 11})
    from typer.testing import CliRunner

    from loracli.cli import app

    spy = UnetCalls()
    with pytest.MonkeyPatch.context() as mp, spy.active(mp):
        # a module fixture starts before the per-test `isolated` one: isolate this run itself
        for var, value in {**HERMETIC, "LORA_HOME": root / "home", "LORA_CACHE": root / "hub",
                           "HF_HOME": root / "hf"}.items():
            mp.setenv(var, str(value))
        result = CliRunner().invoke(app, ["train", "--config", str(profile), "--json"],
                                    catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    reference = Reference(base)
    pictures = {name: Image.open(data / f"{name}.png").convert("RGB") for name in PICTURES}
    latents = {}
    for name, im in pictures.items():
        latents[name] = reference.latent(im)
        latents[name + " flipped"] = reference.latent(ImageOps.mirror(im))
    captions = {", ".join(TAGS[:KEEP] + rest): None
                for rest in itertools.permutations(TAGS[KEEP:])}
    captions.update({", ".join(p): None for p in itertools.permutations(TAGS)})
    captions = {c: reference.text(c) for c in captions}
    seen = [{"picture": reference.identify(e, latents),
             "caption": reference.caption_of(e, captions),
             "noise": None} for e in spy.elements()]
    for s, e in zip(seen, spy.elements()):
        s["noise"] = reference.noise(e, latents[s["picture"]])
    return {"run": Path(json.loads(result.stdout)["run"]), "seen": seen, "latents": latents,
            "scaling": reference.vae.config.scaling_factor}


def test_repeats_and_epochs_set_the_run_length(run):
    expected = len(PICTURES) * REPEATS * EPOCHS  # images x repeats x epochs / batch 1
    lines = metrics(run["run"])
    assert [m["step"] for m in lines] == list(range(1, expected + 1))
    assert lines[-1]["max_steps"] == expected and lines[-1]["epoch"] == pytest.approx(EPOCHS)
    assert len(run["seen"]) == expected


def _epochs(run) -> list[list[str]]:
    order = [s["picture"].split()[0] for s in run["seen"]]
    return [order[i:i + PER_EPOCH] for i in range(0, len(order), PER_EPOCH)]


def test_every_epoch_shows_each_picture_repeats_times(run):
    for epoch in _epochs(run):
        assert Counter(epoch) == {name: REPEATS for name in PICTURES}, epoch


def test_each_epoch_is_shuffled_anew(run):
    # 90 orders of {a, a, b, b, c, c}: three independent shuffles all equal has odds 1 in 8100
    epochs = _epochs(run)
    assert len({tuple(e) for e in epochs}) > 1, f"every epoch has the same order: {epochs[0]}"


def test_flipped_pictures_train_on_flipped_latents(run):
    # each draw flips with probability 1/2: 18 draws with no flip (or all flips) has odds 2^-17
    flipped = [s["picture"].endswith("flipped") for s in run["seen"]]
    assert any(flipped) and not all(flipped), flipped
    from safetensors.torch import load_file

    cached = [t for f in sorted((run["run"] / "cache").rglob("*.safetensors"))
              for t in load_file(str(f)).values() if t.shape == run["latents"]["a"].shape]
    assert cached, "no cached latents in the run folder"
    for name, latent in run["latents"].items():  # raw VAE means, or already scaled
        assert any(torch.allclose(c * k, latent, atol=1e-4) for c in cached
                   for k in (1.0, run["scaling"])), f"the cache has no latent of {name}"


def test_keep_tokens_pins_the_leading_tags_and_shuffles_the_rest(run):
    used = [s["caption"].split(", ") for s in run["seen"]]
    assert all(tags[:KEEP] == list(TAGS[:KEEP]) and sorted(tags) == sorted(TAGS)
               for tags in used), used
    # the first free tag is each of the 3 others with odds 1/3: 18 draws always alike, 3^-17
    assert len({tags[KEEP] for tags in used}) > 1, f"tag {KEEP + 1} never moves: {used[0]}"


def test_noise_offset_shifts_each_channel_of_the_noise(run):
    """Offset noise is n + offset * m, with m one normal draw per image and channel: a channel's
    spatial mean then has variance offset^2 + 1/64 (8x8 latents), instead of 1/64 without."""
    noise = torch.stack([s["noise"] for s in run["seen"]])  # (draws, 4, 8, 8)
    means = noise.mean(dim=(2, 3))
    spread = (noise - means[..., None, None]).pow(2).mean()
    assert 0.8 < float(spread) < 1.2  # the rest is unit normal noise
    assert 0.4 * OFFSET**2 < float(means.pow(2).mean()) < 2.0 * OFFSET**2, means


def _cosine_with_warmup(k: int, total: int) -> float:
    """diffusers' `cosine` schedule with linear warm-up, as a factor of the learning rate."""
    if k < WARMUP:
        return k / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (k - WARMUP) / (total - WARMUP)))


def test_warmup_steps_ramp_the_learning_rate_then_cosine(run):
    lines = metrics(run["run"])
    total = len(lines)
    logged = [m["lr"] for m in lines]
    after_step = [LR * _cosine_with_warmup(k, total) for k in range(1, total + 1)]
    during_step = [LR * _cosine_with_warmup(k, total) for k in range(total)]
    assert logged == pytest.approx(after_step, rel=1e-6, abs=1e-12) or \
        logged == pytest.approx(during_step, rel=1e-6, abs=1e-12), logged
