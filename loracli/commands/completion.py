"""`lora completion SHELL`: print the shell completion script (also committed in completions/).

This is the one installer: `lora completion bash > ~/.lora-complete.bash` and source it. The
script calls back into `lora` with `_LORA_COMPLETE=complete_SHELL`, which Typer answers with the
values of each argument's completer (`loracli.ui.completers`), importing nothing heavy.
"""

from __future__ import annotations

import typer

from loracli.ui import completers

SHELLS = ("bash", "zsh", "fish")
FILES = {"bash": "lora.bash", "zsh": "_lora", "fish": "lora.fish"}


def script(shell: str) -> str:
    from typer.completion import get_completion_script  # matches Typer's protocol (< 0.30)

    text = get_completion_script(prog_name="lora", complete_var="_LORA_COMPLETE", shell=shell)
    return text if text.endswith("\n") else text + "\n"


def completion(
    shell: str = typer.Argument(..., help="bash, zsh or fish.", autocompletion=completers.shells),
) -> None:
    """Print the completion script for SHELL; source it from your shell's startup file."""
    if shell not in SHELLS:
        raise typer.BadParameter(f"{shell!r} is not one of {', '.join(SHELLS)}", param_hint="SHELL")
    print(script(shell), end="")
