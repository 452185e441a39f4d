"""`lora completion SHELL`: print the shell completion script (also committed in completions/)."""

from __future__ import annotations

import typer

SHELLS = ("bash", "zsh", "fish")
FILES = {"bash": "lora.bash", "zsh": "_lora", "fish": "lora.fish"}


def script(shell: str) -> str:
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name="lora", complete_var="_LORA_COMPLETE", shell=shell)


def completion(
    shell: str = typer.Argument(..., help="bash, zsh or fish.", autocompletion=lambda: list(SHELLS)),
) -> None:
    """Print the completion script for SHELL (e.g. `lora completion bash > ~/.lora.bash`)."""
    if shell not in SHELLS:
        raise typer.BadParameter(f"{shell!r} is not one of {', '.join(SHELLS)}", param_hint="SHELL")
    print(script(shell), end="" if script(shell).endswith("\n") else "\n")
