"""The profile store: strict parsing, presets, overrides, encodings, and the `lora profile` commands."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from loracli import profiles
from loracli.errors import LoraError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_show_default_prints_the_recommended_values(cli):
    result = cli("profile", "show", "default")
    assert result.exit_code == 0
    text = result.stdout
    for line in ("rank = 8", "alpha = 16", "dropout = 0.1", "batch_size = 4",
                 "learning_rate = 2e-4", 'optimizer = "adamw"', 'mixed_precision = "fp16"',
                 "save_steps = 100"):
        assert line in text, line
    assert "# LoRA rank" in text  # comments are kept: the preset explains itself


def test_validate_reports_every_problem_at_once(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nlearing_rate = 1e-4\nbatch_size = 0\n[lora]\nrank = "eight"\n')
    result = cli("profile", "validate", bad)
    assert result.exit_code == 1
    err = result.stderr
    assert "3 problems" in err
    assert "train.learing_rate: unknown key; did you mean train.learning_rate?" in err
    assert "lora.rank: expected an integer" in err
    assert "train.batch_size: 0 is out of range" in err
    assert "hint:" in err and result.stdout == ""


def test_default_preset_equals_the_dataclass_defaults():
    preset = profiles.parse(tomllib.loads(profiles.preset_text("default")), "default")
    assert preset == profiles.Profile()
    defaults = profiles.Profile()
    assert (defaults.lora.rank, defaults.lora.alpha, defaults.lora.dropout) == (8, 16.0, 0.1)
    assert (defaults.train.batch_size, defaults.train.learning_rate) == (4, 2e-4)
    assert (defaults.train.optimizer, defaults.train.mixed_precision) == ("adamw", "fp16")
    assert defaults.train.save_steps == 100


@pytest.mark.parametrize("name", ["default", "anime", "style", "character", "sdxl-style", "demo"])
def test_every_preset_parses_and_comments_every_key(name):
    text = profiles.preset_text(name)
    data = tomllib.loads(text)
    profiles.parse(data, name)
    keys_in_file = {f"{s}.{k}" for s, table in data.items() for k in table}
    assert keys_in_file == set(profiles.all_keys()), "a preset must list every key"
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line.split("=", 1)[1], f"{name}: no comment on {line!r}"


def test_presets_differ_where_they_should():
    anime = profiles.load("anime")
    sdxl = profiles.load("sdxl-style")
    assert anime.data.shuffle_captions and anime.data.keep_tokens >= 1
    assert sdxl.model.base == "sdxl" and sdxl.data.resolution == 1024
    assert sdxl.train.gradient_checkpointing
    assert profiles.load("character").lora.train_text_encoder


def test_wrong_types_ranges_choices_and_sections_are_named():
    with pytest.raises(profiles.ProfileError) as e:
        profiles.parse({"train": {"mixed_precision": "fp8", "save_steps": 1.5, "seed": -1},
                        "lora": {"targets": "to_q", "train_text_encoder": "yes"},
                        "trian": {"epochs": 1}, "learning_rate": 1e-4})
    problems = "\n".join(e.value.problems)
    assert "train.mixed_precision: 'fp8' is not one of no, fp16, bf16" in problems
    assert "train.save_steps: expected an integer" in problems
    assert "train.seed: -1 is out of range" in problems
    assert "lora.targets: expected a list of strings" in problems
    assert "lora.train_text_encoder: expected true or false" in problems
    assert "[trian]: unknown section; did you mean train?" in problems
    assert "learning_rate: keys belong in a section; did you mean train.learning_rate?" in problems
    assert len(e.value.problems) == 7


def test_combinations_are_checked():
    with pytest.raises(profiles.ProfileError) as e:
        profiles.parse({"train": {"max_steps": 0, "epochs": 0}, "data": {"resolution": 500}})
    assert any("set max_steps or epochs" in p for p in e.value.problems)
    assert any("multiple of 8" in p for p in e.value.problems)


def test_toml_syntax_error_names_line_and_column(cli, tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text('[train]\nlearning_rate = 2e-4\nseed = "42\n')
    result = cli("profile", "validate", bad)
    assert result.exit_code == 1
    assert "invalid TOML" in result.stderr and "line 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_windows_encodings_load_or_fail_clearly(tmp_path):
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + '[data]\ntrigger = "风格"\n'.encode("utf-8"))
    assert profiles.load(str(bom)).data.trigger == "风格"
    gbk = tmp_path / "gbk.toml"
    gbk.write_bytes('[data]\ntrigger = "风格"\n'.encode("gbk"))
    assert profiles.load(str(gbk)).data.trigger == "风格"
    utf16 = tmp_path / "utf16.toml"
    utf16.write_bytes('[train]\nseed = 7\n'.encode("utf-16"))
    assert profiles.load(str(utf16)).train.seed == 7
    garbage = tmp_path / "garbage.toml"
    garbage.write_bytes(b"[train]\nseed = 1\n\x80\xff\xfe\x81\n")
    with pytest.raises(LoraError):
        profiles.load(str(garbage))


def test_overrides_use_the_same_parser():
    p = profiles.load("default", ["train.max_steps=200", "model.base=tiny-sd",
                                  'lora.targets=["to_q"]', "data.flip=true"])
    assert (p.train.max_steps, p.model.base, p.lora.targets, p.data.flip) == (
        200, "tiny-sd", ("to_q",), True)
    with pytest.raises(profiles.ProfileError) as e:
        profiles.load("default", ["train.learing_rate=1e-3"])
    assert "did you mean train.learning_rate?" in e.value.problems[0]
    with pytest.raises(LoraError, match="SECTION.KEY=VALUE"):
        profiles.load("default", ["max_steps"])


def test_yaml_profile_with_the_same_keys(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  max_steps: 50\n  learning_rate: 1.0e-4\nlora:\n  rank: 4\n")
    p = profiles.load(str(path))
    assert (p.train.max_steps, p.train.learning_rate, p.lora.rank) == (50, 1e-4, 4)
    path.write_text("train:\n  max_steps: [\n")
    with pytest.raises(LoraError, match="invalid YAML"):
        profiles.load(str(path))


def test_frozen_profile_round_trips_through_toml():
    p = profiles.load("anime", ["train.seed=7"])
    again = profiles.parse(tomllib.loads(p.to_toml()), "anime")
    assert again == p
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.seed = 1


def test_new_edit_path_list_rm(cli, isolated, tmp_path):
    result = cli("profile", "new", "mystyle", "--from", "style")
    assert result.exit_code == 0
    path = isolated["home"] / "profiles" / "mystyle.toml"
    assert result.stdout.strip() == str(path)
    assert path.read_text() == profiles.preset_text("style")
    assert cli("profile", "new", "mystyle").exit_code == 1  # never overwrites silently

    listing = json.loads(cli("profile", "list", "--json").stdout)
    kinds = {row["name"]: row["kind"] for row in listing}
    assert kinds["mystyle"] == "user" and kinds["default"] == "preset"

    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nsed -i "s/^rank = .*/rank = 32  # edited/" "$1"\n')
    editor.chmod(0o755)
    result = cli("profile", "edit", "mystyle", env={"EDITOR": str(editor)})
    assert result.exit_code == 0
    assert profiles.load("mystyle").lora.rank == 32

    assert cli("profile", "path", "mystyle").stdout.strip() == str(path)
    assert cli("profile", "rm", "mystyle").exit_code == 0
    assert not path.exists()
    result = cli("profile", "rm", "default")
    assert result.exit_code == 1 and "built-in preset" in result.stderr


def test_edit_that_breaks_the_profile_is_reported(cli, tmp_path):
    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nprintf "[train]\\nbatch_size = -1\\n" > "$1"\n')
    editor.chmod(0o755)
    result = cli("profile", "edit", "broken", env={"EDITOR": str(editor)})
    assert result.exit_code == 1
    assert "train.batch_size" in result.stderr


def test_unknown_profile_suggests_a_name(cli):
    result = cli("profile", "show", "defualt")
    assert result.exit_code == 1
    assert "did you mean `default`?" in result.stderr


def test_invalid_profile_names_are_refused(cli):
    result = cli("profile", "new", "../escape")
    assert result.exit_code == 1 and "invalid profile name" in result.stderr


def test_user_profile_shadows_a_preset(cli, isolated):
    (isolated["home"] / "profiles").mkdir(parents=True)
    (isolated["home"] / "profiles" / "anime.toml").write_text("[lora]\nrank = 4\n")
    assert profiles.load("anime").lora.rank == 4


def test_readme_documents_every_profile_key_with_its_default():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
    for row in profiles.key_docs():
        assert f"| `{row['key']}` |" in readme, f"README's key table lacks {row['key']}"


HOSTILE = ["../../victim", "../victim", "/tmp/victim", "..", ".hidden", "a/b", "a\\b", "~/victim",
           "victim\x00", "x" * 65, "victim.toml"]


@pytest.mark.parametrize("name", HOSTILE)
def test_every_command_taking_a_profile_name_checks_it(cli, isolated, name):
    victim = isolated["tmp"] / "victim.toml"  # where ../../victim from the profiles folder lands
    victim.write_text("[train]\nseed = 1\n")
    (isolated["home"] / "profiles").mkdir(parents=True)
    for command in (("rm", name), ("path", name), ("new", name), ("edit", name)):
        result = cli("profile", *command, env={"EDITOR": "true"})
        assert result.exit_code == 1, (command, result.stderr)
        assert result.stderr.startswith("error: invalid profile name"), (command, result.stderr)
        assert "hint: " in result.stderr and "internal error" not in result.stderr
    assert victim.read_text() == "[train]\nseed = 1\n"
    assert list((isolated["home"] / "profiles").iterdir()) == []
    with pytest.raises(LoraError, match="invalid profile name"):
        profiles.user_file(name)


def test_profile_rm_cannot_delete_outside_the_profiles_folder(cli, isolated):
    victim = isolated["tmp"] / "victim.toml"
    victim.write_text("precious")
    result = cli("profile", "rm", "../../victim")
    assert result.exit_code == 1 and "invalid profile name '../../victim'" in result.stderr
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("arg", ["../../etc/passwd", "/etc/passwd", "../../../../etc/shadow"])
def test_showing_a_path_that_is_not_a_profile_is_a_clear_error(cli, arg):
    for command in (("show", arg), ("validate", arg), ("show", arg, "--resolved")):
        result = cli("profile", *command)
        assert result.exit_code == 1, command
        assert result.stdout == "" and "root:" not in result.stderr
        assert result.stderr.startswith(f"error: {arg}: not a profile"), result.stderr
        assert "hint: " in result.stderr and "internal error" not in result.stderr


def test_a_profile_path_that_is_a_folder_names_the_fix(cli, tmp_path):
    plain = tmp_path / "somewhere"
    plain.mkdir()
    run = tmp_path / "output" / "anime"
    run.mkdir(parents=True)
    (run / "profile.toml").write_text("[train]\nseed = 1\n")
    for args in (("profile", "validate", str(plain)), ("train", "--config", str(plain)),
                 ("profile", "validate", f"{plain}/"), ("profile", "show", str(plain))):
        result = cli(*args)
        assert result.exit_code == 1, args
        assert "is a folder, not a profile file" in result.stderr.splitlines()[0]
        assert result.stderr.splitlines()[1].startswith("hint: "), result.stderr
    result = cli("train", "--config", str(run), "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert f"`lora resume {run}`" in document["hint"]
