"""How an export names its base model and data without local paths (pure, no models)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loracli.exporting import provenance


def _blob(cache: Path, data: bytes) -> tuple[Path, str]:
    digest = hashlib.sha256(data).hexdigest()
    blob = cache / "blobs" / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    return blob, digest


def test_a_cached_repo_is_named_by_repo_and_commit_and_its_root_checkpoint_hashes(tmp_path):
    data = bytes(range(256)) * 8192                  # 2 MiB
    blob, digest = _blob(tmp_path, data)
    snapshot = tmp_path / "snapshots" / ("c" * 40)
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "v1-5-pruned-emaonly.safetensors").symlink_to(blob)
    base = {"model": "sd15", "path": str(snapshot), "repo": "org/sd", "commit": "c" * 40}
    ident = provenance.base_identity(base)
    assert (ident.name, ident.label) == ("org/sd", "org/sd@" + "c" * 40)
    assert ident.sha256 == digest                    # the blob's name, no re-hash
    assert ident.legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert ident.path == ""
    assert provenance.base_identity(base, keep_paths=True).path == str(snapshot)


def test_a_local_folder_and_a_single_file_by_base_name(tmp_path):
    folder = tmp_path / "home" / "me" / "models" / "my-sd"
    folder.mkdir(parents=True)
    ident = provenance.base_identity({"model": str(folder), "path": str(folder)})
    assert (ident.name, ident.label, ident.sha256, ident.legacy_hash) == ("my-sd", "my-sd", "", "")
    single = folder / "model.safetensors"
    single.write_bytes(b"x" * 100)
    ident = provenance.base_identity({"model": str(single), "path": str(single)})
    assert ident.name == "model.safetensors"
    assert ident.sha256 == hashlib.sha256(b"x" * 100).hexdigest()
    assert ident.legacy_hash == hashlib.sha256(b"").hexdigest()[:8]   # under 1 MiB: empty window
    assert provenance.public_path(str(folder)) == "my-sd"
    assert provenance.public_path(str(folder), keep_paths=True) == str(folder)


def test_saved_configs_lose_local_paths(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(
        {"_name_or_path": "/home/me/models/sd/unet", "layers_per_block": 2,
         "nested": {"file": "/home/me/models/sd/x.txt", "ok": "keep"}}))
    (tmp_path / "model_index.json").write_text(json.dumps({"_name_or_path": "/home/me/models/sd"}))
    provenance.scrub_config_folder(tmp_path, "org/sd", ["/home/me"])
    unet = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert unet == {"_name_or_path": "org/sd", "layers_per_block": 2,
                    "nested": {"file": "x.txt", "ok": "keep"}}
    assert json.loads((tmp_path / "model_index.json").read_text()) == {"_name_or_path": "org/sd"}


def test_dataset_dirs_and_buckets_as_sd_scripts_writes_them(tmp_path):
    from loracli.training import dataset as ds

    examples = [ds.Example(tmp_path / "10_cat" / "a.png", "cat", "10_cat", 10),
                ds.Example(tmp_path / "10_cat" / "b.png", "cat", "10_cat", 10),
                ds.Example(tmp_path / "c.png", "dog", "data", 1)]
    samples = [ds.Sample(examples[0], (512, 512), (512, 512)),
               ds.Sample(examples[1], (600, 400), (576, 384)),
               ds.Sample(examples[2], (512, 512), (512, 512))]
    data = ds.Dataset(samples, [0] * 10 + [1] * 10 + [2])
    assert provenance.dataset_dirs(data) == {"10_cat": {"n_repeats": 10, "img_count": 2},
                                             "data": {"n_repeats": 1, "img_count": 1}}
    info = provenance.bucket_info(data)
    assert info["buckets"] == {0: {"resolution": [512, 512], "count": 11},
                               1: {"resolution": [576, 384], "count": 10}}
    assert info["mean_img_ar_error"] == 0.0   # 576/384 == 600/400
    (tmp_path / "dataset.json").write_text(json.dumps({"num_images": 3}))
    provenance.record_dataset(tmp_path, data)
    recorded = json.loads((tmp_path / "dataset.json").read_text())
    assert recorded["num_images"] == 3 and recorded["dirs"]["10_cat"]["img_count"] == 2
    assert recorded["buckets"]["buckets"]["1"]["count"] == 10
