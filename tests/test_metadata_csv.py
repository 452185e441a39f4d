"""metadata.csv has one reader: the trainer and `lora caption` read it alike and report a broken
one with the same message, naming the file and the line."""

from __future__ import annotations

import pytest
from PIL import Image

from loracli.captioning import files as caption_files
from loracli.captioning import metadata_csv
from loracli.errors import LoraError
from loracli.training import dataset


def _folder(tmp_path, body: bytes):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_bytes(body)
    return tmp_path


def _messages(folder) -> list[str]:
    out = []
    for read in (lambda: dataset.scan(folder),
                 lambda: caption_files.plan(folder, [folder / "a.png"], ".txt")):
        with pytest.raises(LoraError) as e:
            read()
        out.append(e.value.message)
    return out


def test_captions_come_from_metadata_csv_for_both(tmp_path):
    folder = _folder(tmp_path, "\ufefffile_name,text,score\na.png,\" sks,  red \",5\n,orphan,1\n"
                     .encode("utf-8"))
    assert metadata_csv.captions(folder) == {"a.png": "sks,  red"}
    assert [e.caption for e in dataset.scan(folder)] == ["sks, red"]
    assert [e.existing for e in caption_files.plan(folder, [folder / "a.png"], ".txt")] == \
        ["sks,  red"]
    columns, rows = metadata_csv.read(folder)
    assert columns == ["file_name", "text", "score"] and len(rows) == 2
    assert metadata_csv.read(tmp_path / "elsewhere") == ([], [])


def test_a_header_without_file_name_is_one_error_naming_file_and_line(tmp_path):
    folder = _folder(tmp_path, b"image,caption\na.png,x\n")
    trainer, captioner = _messages(folder)
    assert trainer == captioner
    assert trainer.startswith(f"{folder / 'metadata.csv'}, line 1: ")
    assert "file_name" in trainer and "image, caption" in trainer


def test_text_that_is_not_utf8_is_one_error_naming_its_line(tmp_path):
    folder = _folder(tmp_path, b"file_name,text\na.png,fine\nb.png,caf\xe9\n")
    trainer, captioner = _messages(folder)
    assert trainer == captioner == f"{folder / 'metadata.csv'}, line 3: not UTF-8 text"


def test_the_cli_shows_it_with_the_fix(cli, tmp_path):
    folder = _folder(tmp_path, b"image,caption\na.png,x\n")
    result = cli("caption", folder)
    assert result.exit_code == 1
    assert f"error: {folder / 'metadata.csv'}, line 1:" in result.stderr
    assert "hint:" in result.stderr and "file_name,text" in result.stderr
