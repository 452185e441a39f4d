"""The CLI shell: version, help, one error path, exit codes, --json, light start-up, paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loracli import __version__, paths

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "open_clip",
         "huggingface_hub", "safetensors")


def test_version_and_help(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"lora {__version__}"
    result = cli("--help")
    assert result.exit_code == 0 and "profile" in result.stdout and "doctor" in result.stdout


def test_usage_error_exits_2(cli):
    result = subprocess.run([sys.executable, "-m", "loracli", "profile", "nonsense"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "No such command" in result.stderr


def test_user_error_is_one_line_with_hint_and_exit_1():
    result = subprocess.run([sys.executable, "-m", "loracli", "profile", "show", "nope"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: no profile named 'nope'"
    assert lines[1].startswith("hint: ")
    assert "Traceback" not in result.stderr


def test_json_errors_are_one_document_on_stdout(cli):
    result = cli("profile", "validate", "nope", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"] == "no profile named 'nope'"


def test_internal_errors_hide_the_traceback_unless_debugging(tmp_path):
    # a profile path that is a directory of a strange kind triggers no LoraError path here, so
    # provoke an internal error through a broken settings file read as a profile source
    env = dict(os.environ, LORA_HOME=str(tmp_path))
    code = ("import loracli.profiles as p\n"
            "p.raw_text = lambda name: 1/0\n"
            "from loracli.cli import main\nmain(['profile', 'show', 'default'])\n")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert quiet.returncode == 1
    assert "error: internal error: ZeroDivisionError" in quiet.stderr
    assert "Traceback" not in quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(env, LORA_DEBUG="1"))
    assert loud.returncode == 1 and "Traceback" in loud.stderr


def test_importing_the_cli_loads_nothing_heavy():
    code = ("import sys, loracli.cli\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_paths_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("LORA_CACHE", str(tmp_path / "c"))
    assert paths.config_file() == tmp_path / "h" / "config.toml"
    assert paths.profiles_dir() == tmp_path / "h" / "profiles"
    assert paths.state_dir() == tmp_path / "h" / "state"
    assert paths.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORA_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert paths.cache_dir() == tmp_path / "hf" / "hub"  # shared with diffusers/transformers
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    assert paths.cache_dir() == tmp_path / "hubcache"
    monkeypatch.delenv("LORA_HOME")
    assert "lora" in str(paths.home())


def test_settings_round_trip_and_bad_toml(isolated):
    from loracli import settings
    from loracli.errors import LoraError

    settings.update(lambda s: s.update(default_mirror="hf-mirror"))
    assert settings.load()["default_mirror"] == "hf-mirror"
    paths.config_file().write_text("default_mirror = \n")
    with pytest.raises(LoraError, match="invalid TOML"):
        settings.load()


def test_doctor_reports_device_cache_and_mirror(cli, isolated):
    result = cli("doctor", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["device"]["training_device"] in ("cpu", "cuda", "mps")
    assert report["cache"]["path"] == str(isolated["cache"])
    assert report["cache"]["free_gb"] > 0
    assert report["packages"]["torch"] != "not installed"
    assert report["default_mirror"]


def test_no_color_and_no_ansi_when_piped():
    env = dict(os.environ, NO_COLOR="1")
    out = subprocess.run([sys.executable, "-m", "loracli", "profile", "list"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "\x1b[" not in out.stdout + out.stderr
    assert out.stdout.splitlines()[0].split("\t")[0] == "name"


def test_a_closed_pipe_is_not_an_error():
    proc = subprocess.Popen([sys.executable, "-m", "loracli", "profile", "show", "default"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before lora writes anything (as with `| head -0`)
    _, err = proc.communicate(timeout=60)
    assert b"internal error" not in err and b"Traceback" not in err


def test_usage_errors_are_one_json_document_with_exit_2(cli):
    for args in (("profile", "show", "--json"), ("fetch", "--bogus", "--json"),
                 ("train", "--processes", "0", "--json")):
        result = cli(*args)
        assert result.exit_code == 2, args
        document = json.loads(result.stdout)
        assert document["exit_code"] == 2 and document["error"] and "--help" in document["hint"]
    plain = cli("profile", "show")
    assert plain.exit_code == 2 and plain.stdout == "" and "Missing argument" in plain.stderr


@pytest.mark.parametrize("command", [("profile", "validate", "default"), ("train",),
                                     ("profile", "show", "default")])
def test_set_errors_are_named_as_set_errors_with_exit_2(cli, command):
    typo = cli(*command, "--set", "train.learing_rate=1e-4", "--json")
    assert typo.exit_code == 2
    error = json.loads(typo.stdout)["error"]
    assert error == "--set train.learing_rate: unknown key; did you mean train.learning_rate?"
    malformed = cli(*command, "--set", "max_steps", "--set", "train.max_steps=lots")
    assert malformed.exit_code == 2
    assert "--set 'max_steps': expected SECTION.KEY=VALUE" in malformed.stderr
    assert "--set train.max_steps: expected an integer" in malformed.stderr
    assert "problem in profile" not in malformed.stderr and "internal error" not in malformed.stderr


def _commands(command, path=()):
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, path + (name,))


def test_every_command_help_has_examples(cli):
    import typer

    from loracli.cli import app

    paths_ = list(_commands(typer.main.get_command(app)))
    assert len(paths_) > 25  # every command and subcommand
    for path in paths_:
        result = cli(*path, "--help")
        assert result.exit_code == 0, path
        examples = result.stdout.split("Examples:", 1)
        assert len(examples) == 2, f"lora {' '.join(path)} --help has no Examples"
        assert f"lora {' '.join(path)}".strip() in examples[1], path


def test_ctrl_c_in_any_command_exits_130_with_a_json_document(cli, monkeypatch):
    from loracli import diagnostics

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(diagnostics, "collect", interrupted)
    result = cli("doctor", "--json")
    assert result.exit_code == 130
    assert json.loads(result.stdout)["error"] == "interrupted"
    assert "hint: run `lora doctor --json` again" in result.stderr


def test_ctrl_c_from_the_terminal_exits_130(tmp_path):
    import signal
    import time

    editor = tmp_path / "slow-editor.sh"
    editor.write_text("#!/bin/sh\nexec sleep 30\n")
    editor.chmod(0o755)
    env = dict(os.environ, LORA_HOME=str(tmp_path), EDITOR=str(editor))
    proc = subprocess.Popen([sys.executable, "-m", "loracli", "profile", "edit", "mine"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (tmp_path / "profiles" / "mine.toml").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "error: interrupted" in err and "hint:" in err and "internal error" not in err


def test_the_error_path_uses_no_typer_internals():
    from pathlib import Path

    source = (Path(__file__).resolve().parent.parent / "loracli" / "cli.py").read_text()
    assert "typer.core" not in source and "_click" not in source and "TyperGroup" not in source
    assert "standalone_mode=False" in source


def test_readme_documents_the_json_of_every_command():
    from pathlib import Path

    import typer

    from loracli.cli import app

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
    section = readme.split("## JSON output", 1)[1].split("\n## ", 1)[0]
    root = typer.main.get_command(app)
    with_json = []
    for path in _commands(root):
        command = root
        for name in path:
            command = command.commands[name]
        if any("--json" in getattr(p, "opts", ()) for p in command.params):
            with_json.append("lora " + " ".join(path))
    assert len(with_json) > 20
    for name in with_json:
        assert f"| `{name}` |" in section, f"README's JSON output section lacks {name}"


@pytest.mark.parametrize("module", ["train", "resume", "demo", "profile", "completion",
                                    "doctor", "caption"])
def test_a_command_never_imports_a_sibling_command(module):
    import ast
    from pathlib import Path

    source = (Path(__file__).resolve().parent.parent / "loracli" / "commands" / f"{module}.py")
    for node in ast.walk(ast.parse(source.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("loracli.commands"), (module, node.module)
