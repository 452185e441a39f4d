"""`lora caption`: ranking and caption assembly on constructed embeddings, label banks, folder
bookkeeping, and where weights come from (no open_clip model is built here)."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest

from loracli.captioning import banks, captions
from loracli.captioning import files as caption_files
from loracli.captioning import metadata_csv
from loracli.captioning.banks import Category
from loracli.captioning.files import Entry
from loracli.errors import LoraError


def unit(*rows):
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def words(text: str) -> int:  # a stand-in token counter: one token per word
    return len(text.replace(",", " ").split())


# --- ranking ---------------------------------------------------------------------------------

def test_single_answer_picks_the_closest_label():
    cat = Category("colour", ("red", "green", "blue"))
    labels = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    images = unit([0.1, 0.2, 0.9], [0.9, 0.1, 0.0], [0.1, 0.8, 0.3])
    got = captions.rank(images, cat, labels, unit([1, 1, 1])[0], logit_scale=100)
    assert [[t.label for t in tags] for tags in got] == [["blue"], ["red"], ["green"]]
    assert all(0.9 < tags[0].score <= 1.0 for tags in got)  # probabilities at CLIP's scale


def test_single_answer_below_threshold_gives_no_tag():
    cat = Category("lighting", ("day", "night"), threshold=0.8)
    labels = unit([1, 0], [0, 1])
    images = unit([1, 0.02], [1, 1])  # clear day; a tie between day and night
    got = captions.rank(images, cat, labels, unit([1, 1])[0], logit_scale=100)
    assert [t.label for t in got[0]] == ["day"]
    assert got[1] == []


def test_logit_scale_sharpens_probabilities():
    cat = Category("c", ("a", "b"), threshold=0.7)
    labels, image = unit([1, 0], [0, 1]), unit([1, 0.8])
    assert captions.rank(image, cat, labels, unit([1, 1])[0], logit_scale=1)[0] == []
    assert [t.label for t in captions.rank(image, cat, labels, unit([1, 1])[0], 100)[0]] == ["a"]


def test_multi_label_takes_top_k_above_the_neutral_baseline():
    cat = Category("subject", ("cat", "dog", "tree", "car"), mode="multi", top_k=2, margin=0.05)
    labels = unit([1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0])
    neutral = unit([0, 0, 0, 0, 1])[0]
    images = unit([0.9, 0.7, 0.1, 0.0, 0.5],   # cat and dog beat the baseline, cat first
                  [0.3, 0.3, 0.3, 0.3, 1.0],   # nothing beats "something"
                  [0.0, 0.2, 0.95, 0.9, 0.3])  # tree, car (dog is below the baseline)
    got = captions.rank(images, cat, labels, neutral)
    assert [[t.label for t in tags] for tags in got] == [["cat", "dog"], [], ["tree", "car"]]
    assert got[0][0].score > got[0][1].score > 0.05


def test_multi_label_margin_drops_weak_labels():
    labels, neutral = unit([1, 0, 0], [0, 1, 0]), unit([0, 0, 1])[0]
    image = unit([1, 0.6, 0.3])  # gains over the baseline: a 0.58, b 0.25
    strict = Category("style", ("a", "b"), mode="multi", top_k=5, margin=0.3)
    loose = Category("style", ("a", "b"), mode="multi", top_k=5, margin=0.2)
    assert [t.label for t in captions.rank(image, strict, labels, neutral)[0]] == ["a"]
    assert [t.label for t in captions.rank(image, loose, labels, neutral)[0]] == ["a", "b"]


def test_template_average_is_unit_length_and_per_label():
    cat = Category("c", ("x", "y"), templates=("{}", "a {}"), neutral="n")
    assert captions.label_texts(cat) == ["x", "a x", "y", "a y", "n", "a n"]
    rows = unit([1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0.1, 1])
    labels, neutral = captions.average_templates(rows, cat)
    assert labels.shape == (2, 3) and neutral.shape == (3,)
    np.testing.assert_allclose(np.linalg.norm(labels, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(labels[1], [0, 1, 0], atol=1e-6)
    assert labels[0][0] > labels[0][1] > 0


def test_rank_bank_keeps_bank_order():
    bank = banks.Bank((Category("medium", ("photo", "painting")),
                          Category("colour", ("red", "blue"), mode="multi", top_k=1)))
    emb = {"medium": (unit([1, 0], [0, 1]), unit([1, 1])[0]),
           "colour": (unit([0, 1], [1, 0]), unit([1, 1])[0])}
    got = captions.rank_bank(unit([0.2, 1.0]), bank, emb, 100)
    assert [(t.category, t.label) for t in got[0]] == [("medium", "painting"), ("colour", "red")]


# --- caption text ----------------------------------------------------------------------------

def test_assemble_puts_the_prefix_first_and_skips_repeats():
    text = captions.assemble("sks style", ["a cat", "A Cat", "oil painting", "sks style"], words)
    assert text == "sks style, a cat, oil painting"


def test_assemble_stays_within_the_token_limit():
    tags = [f"tag{i} word" for i in range(100)]
    text = captions.assemble("trigger", tags, words, max_tokens=11)
    assert words(text) <= 11
    assert text == "trigger, tag0 word, tag1 word, tag2 word, tag3 word, tag4 word"
    # a short tag further down still fits after a long one was dropped
    assert captions.assemble("t", ["a b c d", "e"], words, max_tokens=3) == "t, e"


def test_assemble_with_real_clip_tokens_never_passes_75():
    count = captions.clip_token_counter()
    bank = banks.load_bank()
    tags = [label for cat in bank.categories for label in cat.labels]
    text = captions.assemble("sks style", tags, count)
    assert 60 <= count(text) <= captions.MAX_TOKENS
    assert text.startswith("sks style, ")


def test_assemble_append_keeps_the_existing_caption():
    text = captions.assemble("sks", ["red", "square"], words, existing="my own words, red")
    assert text == "sks, my own words, red, square"
    assert captions.assemble("", ["b"], words, existing="a") == "a, b"


def test_prefix_longer_than_clip_is_refused():
    with pytest.raises(LoraError, match="75"):
        captions.check_prefix("word " * 80, words)


def test_tag_frequency_counts_images_per_tag():
    freq = captions.tag_frequency(["sks, red, square", "sks, blue, circle, blue", "sks, red", ""])
    assert freq == {"sks": 3, "red": 2, "blue": 1, "circle": 1, "square": 1}
    assert list(freq) == ["sks", "red", "blue", "circle", "square"]


# --- label banks -----------------------------------------------------------------------------

def test_builtin_bank_has_a_few_hundred_labels_in_both_modes():
    bank = banks.load_bank()
    assert 250 <= bank.num_labels <= 1000
    names = [c.name for c in bank.categories]
    for wanted in ("medium", "subject", "style", "lighting", "colour", "composition"):
        assert wanted in names
    assert {c.mode for c in bank.categories} == {"single", "multi"}
    for c in bank.categories:
        assert len(set(c.labels)) == len(c.labels)
        assert all(" by " not in label for label in c.labels)  # no "in the style of <person>"


def test_bank_errors_are_reported_together(tmp_path):
    bad = tmp_path / "bank.toml"
    bad.write_text('templats = ["{}"]\n'
                   '[[category]]\nname = "colour"\nmode = "several"\nlabels = ["red, blue", "red"]\n'
                   '[[category]]\nname = "x"\nlabels = ["a", "a"]\ntop_k = 0\n'
                   'templates = ["no placeholder"]\nthreshold = 2\n', "utf-8")
    with pytest.raises(LoraError) as e:
        banks.load_bank([str(bad)])
    details = "\n".join(e.value.details)
    assert "templats: unknown key; did you mean templates?" in details
    assert "mode: 'several' is not one of single, multi" in details
    assert "holds a comma" in details
    assert "'a' is listed twice" in details
    assert "top_k" in details and "threshold" in details and "exactly one {}" in details
    assert len(e.value.details) == 7


def test_banks_combine_and_refuse_duplicate_categories(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('[[category]]\nname = "shape"\nlabels = ["square", "circle"]\n', "utf-8")
    bank = banks.load_bank(["default", str(mine)])
    assert bank.categories[-1].name == "shape"
    assert bank.categories[-1].templates == banks.DEFAULT_TEMPLATES
    with pytest.raises(LoraError, match="defined in both"):
        banks.load_bank([str(mine), str(mine)])
    with pytest.raises(LoraError, match="no such file or built-in") as e:
        banks.load_bank(["nope.toml"])
    assert "default" in e.value.hint


# --- folder bookkeeping ----------------------------------------------------------------------

def test_plan_keeps_the_newer_of_metadata_row_and_caption_file(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a.txt").write_text("from file\n", "utf-8")
    (tmp_path / "d.txt").write_text("d file\n", "utf-8")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,from row\nb.png,row b\nd.png,\n",
                                           "utf-8")
    os.utime(tmp_path / "a.txt", (1e9, 1e9))  # written before metadata.csv
    entries = caption_files.plan(tmp_path, sorted(tmp_path.glob("*.png")), ".txt")
    assert [e.existing for e in entries] == ["from row", "row b", None, "d file"]
    os.utime(tmp_path / "a.txt", (4e9, 4e9))  # edited after metadata.csv: the edit wins
    entries = caption_files.plan(tmp_path, sorted(tmp_path.glob("*.png")), ".txt")
    assert [e.existing for e in entries] == ["from file", "row b", None, "d file"]


def test_metadata_keeps_other_columns_and_rows(tmp_path):
    old = [{"file_name": "a.png", "text": "old", "score": "5"},
           {"file_name": "sub/z.png", "text": "elsewhere", "score": "1"}]
    entries = [Entry(tmp_path / "a.png", tmp_path / "a.txt", "old", "new, tags", "captioned"),
               Entry(tmp_path / "b.png", tmp_path / "b.txt", None, "b tags", "captioned"),
               Entry(tmp_path / "c.png", tmp_path / "c.txt", None, None, "failed")]
    text = caption_files.metadata_text(["file_name", "text", "score"], old, entries)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows == [{"file_name": "a.png", "text": "new, tags", "score": "5"},
                    {"file_name": "b.png", "text": "b tags", "score": ""},
                    {"file_name": "sub/z.png", "text": "elsewhere", "score": "1"}]


def test_metadata_without_file_name_is_a_clear_error(tmp_path):
    (tmp_path / "metadata.csv").write_text("image,caption\na.png,x\n", "utf-8")
    with pytest.raises(LoraError, match="file_name"):
        metadata_csv.read(tmp_path)


# --- the command's errors (no model needed) --------------------------------------------------

def test_missing_and_empty_folders_are_errors(cli, tmp_path):
    r = cli("caption", tmp_path / "nope")
    assert r.exit_code == 1 and "no such folder" in r.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    r = cli("caption", tmp_path / "empty")
    assert r.exit_code == 1 and "no images found" in r.stderr and "hint:" in r.stderr
    (tmp_path / "nested" / "sub").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "nested" / "sub" / "a.png")
    r = cli("caption", tmp_path / "nested")
    assert r.exit_code == 1 and f"hint: lora caption {tmp_path / 'nested'} --recursive" in r.stderr


def test_bad_options_are_errors(cli, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    r = cli("caption", tmp_path, "--existing", "merge")
    assert r.exit_code == 1 and "--existing merge" in r.stderr
    r = cli("caption", tmp_path, "--ext", "png")
    assert r.exit_code == 1 and "would overwrite" in r.stderr
    assert not (tmp_path / "metadata.csv").exists()


# --- where weights come from -----------------------------------------------------------------

def _fake_snapshot(cache, repo_id: str, files: dict[str, bytes]):
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_missing_default_weights_name_the_fetch_command(isolated):
    from loracli.captioning import clipmodel

    with pytest.raises(LoraError) as e:
        clipmodel.resolve_weights("ViT-L-14", "openai")
    assert e.value.hint == "lora fetch clip-vit-l-14"
    assert str(isolated["cache"]) in e.value.message


def test_missing_weights_through_the_cli(cli, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    r = cli("caption", tmp_path)
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1] == "hint: lora fetch clip-vit-l-14"
    assert not (tmp_path / "a.txt").exists()


def test_cached_openai_weights_load_with_quick_gelu(isolated):
    from loracli.captioning import clipmodel

    snap = _fake_snapshot(isolated["cache"], "timm/vit_large_patch14_clip_224.openai",
                          {"open_clip_config.json": b"{}", "open_clip_model.safetensors": b"w"})
    name, file, extra, identity = clipmodel.resolve_weights("ViT-L-14", "openai")
    assert (name, file) == ("ViT-L-14", str(snap / "open_clip_model.safetensors"))
    assert extra["force_quick_gelu"] is True
    assert extra["force_preprocess_cfg"]["interpolation"] == "bicubic"
    assert "openai" in identity


def test_other_tags_and_repos(isolated):
    from loracli.captioning import clipmodel

    with pytest.raises(LoraError) as e:  # not an alias: the hint says which files to fetch
        clipmodel.resolve_weights("ViT-L-14", "laion2b_s32b_b82k")
    assert e.value.hint.startswith("lora fetch laion/CLIP-ViT-L-14-laion2B-s32B-b82K --include")
    _fake_snapshot(isolated["cache"], "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
                   {"open_clip_pytorch_model.bin": b"w"})
    _, file, extra, _ = clipmodel.resolve_weights("ViT-L-14", "laion2b_s32b_b82k")
    assert file.endswith("open_clip_pytorch_model.bin")
    assert extra["force_quick_gelu"] is False
    assert tuple(extra["force_preprocess_cfg"]["mean"]) == (0.5, 0.5, 0.5)
    with pytest.raises(LoraError, match="no weights tagged") as e:
        clipmodel.resolve_weights("ViT-L-14", "nonsense")
    assert "openai" in e.value.hint


def test_local_weights(tmp_path):
    from loracli.captioning import clipmodel

    with pytest.raises(LoraError, match="no open_clip_config.json"):
        clipmodel.resolve_weights("ViT-B-32", f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(LoraError, match="no weights file"):
        clipmodel.resolve_weights("ViT-B-32", f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"w")
    name, file, _, ident1 = clipmodel.resolve_weights("ViT-B-32", f"local-dir:{tmp_path}")
    assert name == f"local-dir:{tmp_path}" and file is None
    os.utime(tmp_path / "open_clip_model.safetensors", ns=(1, 1))
    assert clipmodel.resolve_weights("ViT-B-32", f"local-dir:{tmp_path}")[3] != ident1
    name, file, _, _ = clipmodel.resolve_weights(
        "ViT-B-32", str(tmp_path / "open_clip_model.safetensors"))
    assert (name, file) == ("ViT-B-32", str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(LoraError, match="no such weights file"):
        clipmodel.resolve_weights("ViT-B-32", str(tmp_path / "missing.safetensors"))


def test_hf_hub_repos_come_from_the_cache(isolated):
    from loracli.captioning import clipmodel

    repo = "someone/tiny-open-clip"
    with pytest.raises(LoraError) as e:
        clipmodel.resolve_weights("hf-hub:" + repo, "openai")
    assert e.value.hint == f"lora fetch {repo}"
    snap = _fake_snapshot(isolated["cache"], repo, {"open_clip_config.json": b"{}",
                                                    "open_clip_model.safetensors": b"w"})
    for model, weights in ((f"hf-hub:{repo}", "openai"), ("ViT-L-14", f"hf-hub:{repo}")):
        name, file, _, _ = clipmodel.resolve_weights(model, weights)
        assert (name, file) == (f"local-dir:{snap}", None)


def test_loading_is_offline_and_puts_the_setting_back(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    from loracli.captioning import clipmodel

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = {}

    def fake_create(*args):
        seen["env"], seen["const"] = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
        raise LoraError("stop here")

    monkeypatch.setattr(clipmodel, "_create", fake_create)
    (tmp_path / "open_clip_config.json").write_text("{}")
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"w")
    with pytest.raises(LoraError, match="stop here"):
        clipmodel.load("x", f"local-dir:{tmp_path}", device="cpu")
    assert seen == {"env": "1", "const": True}
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False
