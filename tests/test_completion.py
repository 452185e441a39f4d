"""Shell completion through the protocol the shell uses (`_LORA_COMPLETE=complete_bash`,
`COMP_WORDS`, `COMP_CWORD`): profiles, models, mirrors, runs and LoRA files complete, nothing
heavy is imported, the committed scripts are current, and there is one installer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loracli.commands.completion import FILES, script

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "open_clip",
         "huggingface_hub", "safetensors")
PROBE = ("import sys\nfrom loracli.cli import main\n"
         "try:\n    main()\nexcept SystemExit:\n    pass\n"
         f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
         "print('HEAVY:' + ','.join(heavy), file=sys.stderr)\n")


def complete(line: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for `line` (the last word is the one being completed)."""
    words = line.split(" ")
    env = dict(os.environ, _LORA_COMPLETE="complete_bash", COMP_WORDS=line,
               COMP_CWORD=str(len(words) - 1), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE, "lora"], capture_output=True, text=True,
                         env=env, cwd=cwd)
    assert "HEAVY:\n" in out.stderr, f"completion imported {out.stderr}"
    return out.stdout.split()


@pytest.mark.parametrize("shell", sorted(FILES))
def test_committed_completion_scripts_are_current(shell):
    committed = (ROOT / "completions" / FILES[shell]).read_text()
    assert committed.rstrip("\n") == script(shell).rstrip("\n"), (
        f"completions/{FILES[shell]} is stale: run `lora completion {shell} > completions/{FILES[shell]}`")


def test_one_installer(cli):
    result = cli("completion", "fish")
    assert result.exit_code == 0 and "_LORA_COMPLETE=complete_fish" in result.stdout
    assert cli("completion", "tcsh").exit_code == 2
    assert "--install-completion" not in cli("--help").stdout
    assert cli("--install-completion").exit_code == 2


def test_profile_names_complete(isolated):
    (isolated["home"] / "profiles").mkdir(parents=True)
    (isolated["home"] / "profiles" / "dreamy.toml").write_text("")
    assert complete("lora profile show d") == ["default", "demo", "dreamy"]
    assert "dreamy" in complete("lora train --profile ")


def test_fetch_completes_aliases_and_cached_models(isolated):
    (isolated["cache"] / "models--someorg--my-model" / "snapshots").mkdir(parents=True)
    offered = complete("lora fetch ")
    assert {"sd15", "sdxl", "tiny-sd", "someorg/my-model"} <= set(offered)
    assert complete("lora fetch sd2") == ["sd21", "sd21-base"]
    assert complete("lora cache rm ") == ["someorg/my-model"]  # cached models only
    (isolated["cache"] / "models--loracli--tiny-sd" / "snapshots").mkdir(parents=True)
    assert complete("lora cache rm ") == ["someorg/my-model", "tiny-sd"]  # the alias if any


def test_mirror_option_completes_mirrors(isolated):
    offered = complete("lora fetch sd15 --mirror hf")
    assert offered == ["hf", "hf-mirror"]
    assert "hf-mirror" in complete("lora mirror sync --mirror ")


def test_runs_complete_for_export_resume_and_inspect(isolated, tmp_path):
    run = tmp_path / "output" / "mystyle"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "mystyle.safetensors").write_bytes(b"")
    (tmp_path / "output" / "notarun").mkdir()
    for command in ("export", "resume"):
        assert complete(f"lora {command} ", cwd=tmp_path) == ["output/mystyle"], command
        assert complete(f"lora {command} out", cwd=tmp_path) == ["output/mystyle"], command
    assert "output/mystyle/mystyle.safetensors" in complete("lora inspect ", cwd=tmp_path)
    # a profile whose output folder holds a run completes by name too
    profiles = isolated["home"] / "profiles"
    profiles.mkdir(parents=True)
    (profiles / "mine.toml").write_text(f'[train]\noutput_dir = "{run.as_posix()}"\n')
    assert "mine" in complete("lora resume ", cwd=tmp_path)
