"""Dataset scanning, buckets, batch order and caption transforms (tier 1: PIL and numpy only)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from loracli.errors import LoraError
from loracli.training import dataset as ds


def _img(path, size=(64, 64), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_scan_reads_caption_files_repeat_folders_and_metadata(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red   square \n", "utf-8")
    _img(tmp_path / "10_hero" / "b.jpg")
    (tmp_path / "10_hero" / "b.caption").write_text("hero, smiling", "utf-8")
    _img(tmp_path / "meta" / "c.png")
    (tmp_path / "meta" / "metadata.csv").write_text("file_name,text\nc.png,\"from, csv\"\n", "utf-8")
    (tmp_path / "meta" / "c.caption").write_text("ignored: csv wins", "utf-8")

    found = {e.path.name: e for e in ds.scan(tmp_path, caption_ext="caption")}
    assert found["b.jpg"].caption == "hero, smiling" and found["b.jpg"].repeats == 10
    assert found["b.jpg"].folder == "10_hero"
    assert found["c.png"].caption == "from, csv" and found["c.png"].repeats == 1
    assert found["a.png"].caption == ""  # a.txt is not the .caption extension

    found = {e.path.name: e for e in ds.scan(tmp_path)}
    assert found["a.png"].caption == "a red square"


def test_trigger_leads_captions_and_replaces_missing_ones_with_a_warning(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red square", "utf-8")
    _img(tmp_path / "b.png")
    (tmp_path / "c.png").write_text("not an image at all")
    warnings = []
    found = {e.path.name: e.caption for e in ds.scan(tmp_path, trigger="sks", on_warning=warnings.append)}
    assert found["a.png"] == "sks, red square"
    assert found["b.png"] == "sks"
    assert any("no caption" in w and "b.png" in w and "'sks'" in w for w in warnings)

    data = ds.plan(ds.scan(tmp_path), 64, 64, True, on_warning=warnings.append)
    assert [s.example.path.name for s in data.samples] == ["a.png", "b.png"]
    assert any(w.startswith("skipping") and "c.png" in w for w in warnings)


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LoraError, match="no images found") as e:
        ds.scan(tmp_path)
    assert "data.dir" in e.value.hint


@pytest.mark.parametrize("size,resolution,step", [((64, 64), 512, 64), ((1000, 300), 512, 64),
                                                  ((4000, 3000), 1024, 64), ((130, 70), 64, 8),
                                                  ((50, 700), 256, 32)])
def test_buckets_never_upscale(size, resolution, step):
    bw, bh = ds.bucket_for(size, resolution, step)
    assert bw % step == 0 and bh % step == 0
    assert bw <= size[0] and bh <= size[1]
    assert bw * bh <= resolution * resolution
    sample = ds.Sample(ds.Example(None, ""), size, (bw, bh))
    (rw, rh), (top, left) = ds.geometry(sample, "center")
    assert rw <= size[0] and rh <= size[1]           # resized down or kept, never up
    assert rw >= bw and rh >= bh and 0 <= top <= rh - bh and 0 <= left <= rw - bw


def test_bucketing_keeps_aspect_ratio_and_small_images_are_skipped(tmp_path):
    assert ds.bucket_for((1024, 512), 512, 64) == (704, 320)
    assert ds.bucket_for((1024, 512), 512, 64, bucketing=False) == (512, 512)
    assert ds.bucket_for((40, 40), 512, 64) is None


def _dataset(n_square=5, n_wide=3, repeats=1):
    samples = [ds.Sample(ds.Example(f"s{i}", ""), (64, 64), (64, 64)) for i in range(n_square)]
    samples += [ds.Sample(ds.Example(f"w{i}", ""), (128, 64), (128, 64)) for i in range(n_wide)]
    order = [i for i in range(len(samples)) for _ in range(repeats)]
    return ds.Dataset(samples, order)


def test_epoch_batches_are_full_single_bucket_and_a_function_of_seed_and_epoch():
    data = _dataset(repeats=2)
    a = ds.epoch_batches(data, 4, seed=1, epoch=0)
    assert a == ds.epoch_batches(data, 4, seed=1, epoch=0)
    assert a != ds.epoch_batches(data, 4, seed=1, epoch=1)
    assert a != ds.epoch_batches(data, 4, seed=2, epoch=0)
    assert len(a) == ds.batches_per_epoch(data, 4) == 3 + 2
    for batch in a:
        assert len(batch) == 4
        assert len({data.samples[i].bucket for i in batch}) == 1
    seen = Counter(i for batch in a for i in batch)
    assert all(seen[i] >= 2 for i in range(len(data.samples)))  # every repeat is used


def test_caption_shuffle_keeps_leading_tokens_and_dropout_empties():
    rng = np.random.default_rng(0)
    caption = "sks, a, b, c, d, e, f"
    outs = {ds.transform_caption(caption, rng, True, 1, 0.0) for _ in range(30)}
    assert len(outs) > 5
    assert all(o.startswith("sks, ") and sorted(o.split(", ")) == sorted(caption.split(", "))
               for o in outs)
    assert ds.transform_caption(caption, rng, False, 0, 0.0) == caption
    dropped = [ds.transform_caption(caption, rng, False, 0, 0.5) for _ in range(200)]
    assert 60 < dropped.count("") < 140


def test_load_pixels_crops_flips_and_scales_to_minus_one_one(tmp_path):
    im = Image.new("RGB", (80, 64), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 64))  # a blue strip on the left
    im.save(tmp_path / "x.png")
    sample = ds.Sample(ds.Example(tmp_path / "x.png", ""), (80, 64), (64, 64))
    resized, top_left = ds.geometry(sample, "center")
    assert resized == (80, 64) and top_left == (0, 8)
    pixels = ds.load_pixels(sample, resized, (0, 0), False)
    assert pixels.shape == (3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[2, 0, 0] == 1.0 and pixels[0, 0, 63] == 1.0
    flipped = ds.load_pixels(sample, resized, (0, 0), True)
    assert flipped[2, 0, 63] == 1.0


def test_tag_frequency_per_folder():
    examples = [ds.Example(None, "sks, red", "10_a"), ds.Example(None, "sks, blue", "10_a"),
                ds.Example(None, "sks", "b")]
    assert ds.tag_frequency(examples) == {"10_a": {"sks": 2, "red": 1, "blue": 1}, "b": {"sks": 1}}
