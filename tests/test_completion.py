"""Shell completion: committed scripts stay current; profile names complete without heavy imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loracli.commands.completion import FILES, script

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("shell", sorted(FILES))
def test_committed_completion_scripts_are_current(shell):
    committed = (ROOT / "completions" / FILES[shell]).read_text()
    assert committed.rstrip("\n") == script(shell).rstrip("\n"), (
        f"completions/{FILES[shell]} is stale: run `lora completion {shell} > completions/{FILES[shell]}`")


def test_completion_command_prints_the_script(cli):
    result = cli("completion", "fish")
    assert result.exit_code == 0 and "_LORA_COMPLETE=complete_fish" in result.stdout
    assert cli("completion", "tcsh").exit_code == 2


def test_profile_names_complete_without_heavy_imports(isolated):
    (isolated["home"] / "profiles").mkdir(parents=True)
    (isolated["home"] / "profiles" / "dreamy.toml").write_text("")
    code = ("import sys\nfrom loracli.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'huggingface_hub') "
            "if m in sys.modules]\nprint('HEAVY:' + ','.join(heavy), file=sys.stderr)\n")
    env = dict(os.environ, _LORA_COMPLETE="complete_bash", COMP_WORDS="lora profile show d",
               COMP_CWORD="3")
    out = subprocess.run([sys.executable, "-c", code, "lora"], capture_output=True, text=True,
                         env=env)
    assert out.stdout.split() == ["default", "demo", "dreamy"]
    assert "HEAVY:\n" in out.stderr
