"""`lora caption` end to end through the CLI, with a tiny open_clip the session first TEACHES
(a few seconds of CPU contrastive training) to tell red squares from blue circles; then real-world
files (EXIF rotation, RGBA, CMYK, 16-bit, zero-byte, corrupt, bombs, non-images), the existing-
caption modes, the text-embedding cache, and the trainer's dataset code reading the output."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

COLOURS = {"red": (215, 30, 35), "blue": (30, 45, 215)}
KINDS = (("red", "square"), ("blue", "circle"))
TEMPLATES = ["{}", "an image of {}", "a picture showing {}"]
BANK = """
templates = ["{}", "an image of {}", "a picture showing {}"]

[[category]]
name = "colour"
labels = ["red", "blue"]

[[category]]
name = "shape"
labels = ["square", "circle"]
"""


def draw(colour: str, shape: str, rng: random.Random, size: int | None = None, mode="RGB"):
    from PIL import Image, ImageDraw

    w = size or rng.choice([40, 56, 64, 96])
    bg = tuple(rng.randint(150, 255) for _ in range(3))
    im = Image.new("RGB", (w, w), bg)
    s = rng.randint(w // 3, w * 2 // 3)
    x, y = rng.randint(0, w - s), rng.randint(0, w - s)
    d = ImageDraw.Draw(im)
    (d.rectangle if shape == "square" else d.ellipse)([x, y, x + s, y + s], fill=COLOURS[colour])
    return im


@pytest.fixture(scope="session")
def taught_clip(tiny_open_clip, tmp_path_factory) -> Path:
    """The tiny open_clip, taught to name colour and shape; saved as a `local-dir:` folder."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    torch.manual_seed(0)
    rng = random.Random(0)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_open_clip}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_open_clip}")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    questions = [("red", "blue"), ("square", "circle")]
    model.train()
    for _step in range(25):
        kinds = [KINDS[rng.randrange(2)] for _ in range(16)]
        images = model.encode_image(torch.stack([preprocess(draw(c, s, rng)) for c, s in kinds]),
                                    normalize=True)
        loss = 0.0
        for q, answers in enumerate(questions):  # image → text contrastive loss per question
            template = rng.choice(TEMPLATES)
            texts = model.encode_text(tokenizer([template.format(a) for a in answers]),
                                      normalize=True)
            target = torch.tensor([answers.index(k[q]) for k in kinds])
            loss = loss + F.cross_entropy(model.logit_scale.exp() * images @ texts.T, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dest = tmp_path_factory.mktemp("taught-clip")
    shutil.copy(tiny_open_clip / "open_clip_config.json", dest / "open_clip_config.json")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(dest / "open_clip_model.safetensors"))
    return dest


@pytest.fixture
def bank(tmp_path) -> Path:
    path = tmp_path / "shapes.toml"
    path.write_text(BANK, "utf-8")
    return path


def make_folder(root: Path, n: int = 5, seed: int = 1) -> dict[str, tuple[str, str]]:
    """n red squares and n blue circles (PNG and JPEG); returns {file name: (colour, shape)}."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(n):
        for colour, shape in KINDS:
            name = f"{shape}_{i}.{'png' if i % 2 else 'jpg'}"
            draw(colour, shape, rng).save(root / name, quality=95)
            truth[name] = (colour, shape)
    return truth


def assert_right(text: str, colour: str, shape: str, name: str = ""):
    tags = [t.strip() for t in text.split(",")]
    assert colour in tags and shape in tags, f"{name}: {text!r}"
    wrong = {"red", "blue", "square", "circle"} - {colour, shape}
    assert not wrong & set(tags), f"{name}: {text!r}"


def test_caption_names_colour_and_shape_then_the_trainer_reads_it(cli, taught_clip, bank,
                                                                  tmp_path):
    data = tmp_path / "data"
    truth = make_folder(data)
    (data / "notes.md").write_text("not an image")
    (data / ".hidden.png").write_bytes(b"")
    r = cli("caption", data, "--weights", f"local-dir:{taught_clip}", "--labels", bank,
            "--prefix", "sks style", "--batch-size", "4", "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["captioned"] == len(truth) == 10 and result["failed"] == []
    for name, (colour, shape) in truth.items():
        text = (data / name).with_suffix(".txt").read_text("utf-8").strip()
        assert text.startswith("sks style, ")
        assert_right(text, colour, shape, name)
    assert not (data / "notes.txt").exists() and not (data / ".hidden.txt").exists()
    with open(data / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = {row["file_name"]: row["text"] for row in csv.DictReader(f)}
    assert set(rows) == set(truth)
    assert all(rows[n] == (data / n).with_suffix(".txt").read_text("utf-8").strip() for n in rows)
    assert result["tag_frequency"] == {"sks style": 10, "blue": 5, "circle": 5, "red": 5,
                                       "square": 5}

    from loracli.training import dataset  # the trainer's own reader, last

    examples = dataset.scan(data)
    assert {e.path.name: e.caption for e in examples} == rows


def test_real_world_files(cli, taught_clip, bank, tmp_path):
    from PIL import Image

    rng = random.Random(7)
    data = tmp_path / "messy"
    data.mkdir()
    draw("red", "square", rng, 64).save(data / "plain.png")
    # stored sideways with an EXIF orientation tag (6 = rotate 90° clockwise to view)
    sideways = draw("blue", "circle", rng, 64).resize((64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(data / "exif.jpg", exif=exif, quality=95)
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent, flattened onto white
    rgba.paste(draw("red", "square", rng, 40), (12, 12))
    rgba.save(data / "alpha.png")
    draw("blue", "circle", rng, 64).convert("CMYK").save(data / "cmyk.jpg", quality=95)
    grey16 = Image.new("I;16", (48, 48), 40000)
    grey16.save(data / "grey16.png")
    (data / "zero.png").write_bytes(b"")
    good = (data / "plain.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 20)
    Image.new("1", (12_000, 9_000)).save(data / "bomb.png")  # 108 MP of nothing, a few KB
    (data / "readme.txt.bak").write_text("ignored")

    r = cli("caption", data, "--weights", f"local-dir:{taught_clip}", "--labels", bank)
    assert r.exit_code == 0, r.stderr
    for name, (colour, shape) in {"plain.png": ("red", "square"), "exif.jpg": ("blue", "circle"),
                                  "alpha.png": ("red", "square"),
                                  "cmyk.jpg": ("blue", "circle")}.items():
        assert_right((data / name).with_suffix(".txt").read_text("utf-8"), colour, shape, name)
    assert (data / "grey16.txt").read_text("utf-8").strip()  # captioned, whatever it shows
    for name in ("zero", "truncated", "garbage", "bomb"):
        assert not (data / f"{name}.txt").exists()
        assert f"{name}." in r.stderr
    assert "empty file" in r.stderr and "decompression bomb" in r.stderr
    assert "captioned 5 of 9 image(s)" in r.stderr
    assert "\nblue\t" in r.stdout or "blue" in r.stdout  # the tag-frequency table

    from loracli.images import load_rgb  # the upright, flattened picture the model saw

    assert load_rgb(data / "exif.jpg").size == (32, 64)
    assert load_rgb(data / "alpha.png").getpixel((1, 1)) == (255, 255, 255)
    assert load_rgb(data / "grey16.png").getpixel((0, 0)) == (155, 155, 155)


def test_nothing_readable_is_exit_1(cli, taught_clip, bank, tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    r = cli("caption", tmp_path, "--weights", f"local-dir:{taught_clip}", "--labels", bank)
    assert r.exit_code == 1
    assert "no image could be captioned" in r.stderr and "a.png" in r.stderr
    assert not (tmp_path / "metadata.csv").exists()


def test_existing_captions_skip_overwrite_append_and_the_text_cache(cli, taught_clip, bank,
                                                                    tmp_path):
    data = tmp_path / "d"
    truth = make_folder(data, n=2)
    (data / "square_0.txt").write_text("hand written\n", "utf-8")
    args = ("caption", data, "--weights", f"local-dir:{taught_clip}", "--labels", bank, "--json")

    first = json.loads(cli(*args).stdout)  # skip (default): the hand-written caption stays
    assert first["captioned"] == 3 and first["kept"] == 1
    assert first["text_cache"] == {"hits": 0, "misses": 2}
    assert (data / "square_0.txt").read_text("utf-8") == "hand written\n"
    rows = {r["file_name"]: r["text"] for r in csv.DictReader(open(data / "metadata.csv"))}
    assert rows["square_0.jpg"] == "hand written"

    again = cli(*args)  # everything has a caption: no model, no work, still success
    assert again.exit_code == 0
    again = json.loads(again.stdout)
    assert again["captioned"] == 0 and again["kept"] == 4
    assert again["text_cache"] == {"hits": 0, "misses": 0}

    appended = json.loads(cli(*args, "--existing", "append", "--prefix", "sks").stdout)
    assert appended["text_cache"] == {"hits": 2, "misses": 0}  # the second run spends no text time
    assert (data / "square_0.txt").read_text("utf-8").strip() == "sks, hand written, red, square"
    assert (data / "circle_1.txt").read_text("utf-8").strip().startswith("sks, blue, circle")

    over = json.loads(cli(*args, "--existing", "overwrite").stdout)
    assert over["captioned"] == 4
    for name, (colour, shape) in truth.items():
        assert (data / name).with_suffix(".txt").read_text("utf-8").strip() == f"{colour}, {shape}"


def test_dry_run_recursive_and_caption_extension(cli, taught_clip, bank, tmp_path):
    data = tmp_path / "set"
    make_folder(data, n=1)
    make_folder(data / "10_more", n=1, seed=5)
    base = ("caption", data, "--weights", f"local-dir:{taught_clip}", "--labels", bank)

    dry = cli(*base, "--recursive", "--dry-run")
    assert dry.exit_code == 0
    assert sorted(p.name for p in data.rglob("*") if p.suffix in (".txt", ".csv")) == []
    lines = dry.stdout.strip().splitlines()
    assert len(lines) == 4 and all("\t" in line for line in lines)

    r = cli(*base, "--recursive", "--ext", ".caption")
    assert r.exit_code == 0, r.stderr
    assert len(list(data.rglob("*.caption"))) == 4 and not list(data.rglob("*.txt"))
    sub_rows = list(csv.DictReader(open(data / "10_more" / "metadata.csv")))
    assert sorted(r["file_name"] for r in sub_rows) == ["circle_0.jpg", "square_0.jpg"]

    from loracli.training import dataset

    examples = dataset.scan(data, caption_ext=".caption")
    assert len(examples) == 4 and all(e.caption in ("red, square", "blue, circle")
                                      for e in examples)


@pytest.mark.gpu
def test_cuda_fp16_gives_the_same_captions(cli, taught_clip, bank, tmp_path):
    truth = make_folder(tmp_path / "g", n=3)
    r = cli("caption", tmp_path / "g", "--weights", f"local-dir:{taught_clip}", "--labels", bank,
            "--device", "cuda", "--json")
    assert r.exit_code == 0, r.stderr
    for name, (colour, shape) in truth.items():
        assert_right((tmp_path / "g" / name).with_suffix(".txt").read_text("utf-8"), colour, shape)


def test_weights_from_the_model_cache_by_repo(cli, taught_clip, bank, tmp_path, isolated):
    """The hub cache layout `lora fetch` writes (blobs + snapshot symlinks + refs/main)."""
    import hashlib

    from loracli.hub import models

    repo_id = "someone/taught-clip"
    repo = models.repo_folder(repo_id)
    (repo / "blobs").mkdir(parents=True)
    commit = "a" * 40
    for f in taught_clip.iterdir():
        if f.name.startswith("."):
            continue
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        models.link_into_snapshot(repo, commit, f.name, digest)
    models.set_ref(repo, "main", commit)
    truth = make_folder(tmp_path / "c", n=1)
    r = cli("caption", tmp_path / "c", "--model", f"hf-hub:{repo_id}", "--labels", bank)
    assert r.exit_code == 0, r.stderr
    for name, (colour, shape) in truth.items():
        assert_right((tmp_path / "c" / name).with_suffix(".txt").read_text("utf-8"), colour, shape)
    r = cli("caption", tmp_path / "c", "--model", "hf-hub:someone/not-fetched", "--labels", bank,
            "--existing", "overwrite")
    assert r.exit_code == 1 and "hint: lora fetch someone/not-fetched" in r.stderr
