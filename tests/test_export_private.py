"""No export publishes the user's local paths unless asked (--keep-paths): not the kohya or
diffusers header, not peft's adapter_config.json, not the merged pipeline's configs. The base
model is named by its hub repo and commit, or a file's base name and hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from export_fixtures import make_run

from loracli.exporting import export as exporting

pytestmark = pytest.mark.slow


def _header(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _texts(path: Path) -> dict[str, str]:
    """Every piece of text an export holds: safetensors headers and JSON files, by file."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = {}
    for f in files:
        if f.suffix == ".safetensors":
            out[str(f)] = json.dumps(_header(f))
        elif f.suffix in (".json", ".txt"):
            out[str(f)] = f.read_text("utf-8", errors="replace")
    return out


def _local(tmp_path_factory) -> list[str]:
    roots = [str(tmp_path_factory.getbasetemp())]
    home = str(Path.home())
    return roots + ([home] if home not in ("/", "") else [])


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sd):
    return make_run(tmp_path_factory.mktemp("private") / "anime", tiny_sd, "sd1")


@pytest.mark.parametrize("format", ["kohya", "diffusers", "peft", "merged"])
def test_no_local_path_in_any_format(run, format, tmp_path, tmp_path_factory):
    result = exporting.export(run, format=format, output=f"{tmp_path / format}/")
    texts = _texts(result.path)
    assert texts and any("loracli/tiny-sd" in t for t in texts.values())
    for root in _local(tmp_path_factory):
        leaks = [f for f, t in texts.items() if root in t]
        assert not leaks, (root, leaks)
    if format == "peft":
        config = json.loads((result.path / "unet" / "adapter_config.json").read_text())
        assert (config["base_model_name_or_path"], config["revision"]) == ("loracli/tiny-sd", "0" * 40)
    if format == "kohya":
        meta = _header(result.path)
        assert meta["ss_sd_model_name"] == "loracli/tiny-sd"
        assert meta["loracli.base_model"] == "loracli/tiny-sd@" + "0" * 40
        assert "loracli.base_path" not in meta


def test_keep_paths_keeps_them(run, tmp_path, tiny_sd):
    meta = _header(exporting.export(run, output=tmp_path / "k.safetensors", keep_paths=True).path)
    assert meta["loracli.base_path"] == str(tiny_sd)
    peft = exporting.export(run, format="peft", output=tmp_path / "p", keep_paths=True).path
    config = json.loads((peft / "unet" / "adapter_config.json").read_text())
    assert config.get("base_model_name_or_path") != "loracli/tiny-sd"


def test_local_folder_base_is_named_by_its_base_name(tmp_path, tiny_sd, tmp_path_factory):
    run = make_run(tmp_path / "local", tiny_sd, "sd1", text_encoder=False)
    info = json.loads((run / "run.json").read_text())
    info["base"].update(repo=None, commit=None)
    (run / "run.json").write_text(json.dumps(info))
    meta = _header(exporting.export(run).path)
    assert meta["ss_sd_model_name"] == meta["loracli.base_model"] == tiny_sd.name
    assert "ss_sd_model_hash" not in meta and "loracli.base_repo" not in meta
    assert not any(root in v for v in meta.values() for root in _local(tmp_path_factory))


def test_single_file_base_is_named_by_base_name_and_hashes(tmp_path, tiny_sd, tmp_path_factory):
    import shutil

    run = make_run(tmp_path / "single", tiny_sd, "sd1", text_encoder=False)
    configs = shutil.copytree(tiny_sd, tmp_path / "configs",
                              ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")])
    checkpoint = tmp_path / "my-model_v2.safetensors"
    data = bytes(range(256)) * (5 * 4096 + 7)   # 5 MiB and a bit: the legacy window is inside
    checkpoint.write_bytes(data)
    info = json.loads((run / "run.json").read_text())
    info["base"].update(model=str(checkpoint), path=str(checkpoint), config_dir=str(configs),
                        repo=None, commit=None)
    (run / "run.json").write_text(json.dumps(info))
    meta = _header(exporting.export(run).path)
    assert meta["ss_sd_model_name"] == "my-model_v2.safetensors"
    # sd-scripts train_util.model_hash / calculate_sha256 (A1111's legacy and new model hashes)
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert not any(root in v for v in meta.values() for root in _local(tmp_path_factory))
