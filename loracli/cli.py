"""The `lora` command: a table of subcommands, and `main`, the one place errors become exit codes.

Typer parses and dispatches (`standalone_mode=False`, so every outcome comes back here); `main`
maps what comes back through one table (`ERRORS`): a `LoraError` is `error:`/`hint:` and its
exit code, a usage error exit 2, Ctrl+C exit 130, a closed pipe a quiet exit, anything else an
internal error. Under `--json` each of them is also one JSON document on stdout.

Nothing heavy is imported here: `lora --help` and shell completion must stay fast. Each command
module imports torch/diffusers/huggingface_hub inside the function that needs them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback

import typer

from loracli import __version__
from loracli.errors import LoraError
from loracli.ui import examples


class Interrupted(LoraError):
    """How Ctrl+C is reported outside the training loop (which saves and stops on its own)."""

    exit_code = 130


def report(error: LoraError, as_json: bool = False) -> None:
    """`error:`, its details and `hint:` on stderr; with `--json` also the document on stdout."""
    if os.environ.get("LORA_DEBUG") and error.__traceback__ is not None:
        traceback.print_exception(error)
    print(f"error: {error.message}", file=sys.stderr)
    for line in error.details:
        print(f"  {line}", file=sys.stderr)
    if error.hint:
        print(f"hint: {error.hint}", file=sys.stderr)
    if as_json:
        document = {**error.to_dict(), "exit_code": error.exit_code}
        print(json.dumps(document, indent=2, ensure_ascii=False), flush=True)


def _user_error(e: LoraError, as_json: bool, args: list[str]) -> int:
    report(e, as_json)
    return e.exit_code


def _usage_error(e: Exception, as_json: bool, args: list[str]) -> int:
    """A bad option or argument (click's UsageError and kin, exit 2): usage on stderr."""
    show = getattr(e, "show", None)
    if show is not None:
        show()
    else:
        print(f"error: {e.format_message()}", file=sys.stderr)
    if as_json:
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx is not None else "lora"
        document = {"error": e.format_message(), "hint": f"`{command} --help` shows the usage",
                    "details": [], "exit_code": e.exit_code}
        print(json.dumps(document, indent=2, ensure_ascii=False), flush=True)
    return e.exit_code


def _interrupted(e: BaseException, as_json: bool, args: list[str]) -> int:
    command = " ".join(["lora", *args])
    report(Interrupted("interrupted", f"run `{command}` again to continue; finished work is kept"),
           as_json)
    return Interrupted.exit_code


def _closed_pipe(e: BaseException, as_json: bool, args: list[str]) -> int:
    # `lora … | head`: the reader left; stop quietly, as Unix tools do on SIGPIPE
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def _internal(e: BaseException, as_json: bool, args: list[str]) -> int:
    if os.environ.get("LORA_DEBUG"):
        traceback.print_exception(e)
    report(LoraError(f"internal error: {type(e).__name__}: {e}",
                     "rerun with LORA_DEBUG=1 to see the traceback, and report it"), as_json)
    return 1


try:  # click's UsageError, BadParameter…: Typer carries its own click since it vendored it
    USAGE_ERRORS: tuple = (typer.TyperException,)
except AttributeError:  # pragma: no cover - an older Typer on top of click
    import click

    USAGE_ERRORS = (click.ClickException,)

# The one table from exception to outcome, most specific first.
ERRORS = (
    (LoraError, _user_error),
    (USAGE_ERRORS, _usage_error),
    ((KeyboardInterrupt, typer.Abort), _interrupted),
    (BrokenPipeError, _closed_pipe),
    (Exception, _internal),
)


def _version(value: bool) -> None:
    if value:
        print(f"lora {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="lora",
    help="Your pictures or chat data to a LoRA that WebUI, ComfyUI, diffusers, transformers and llama.cpp load.",
    no_args_is_help=True,
    add_completion=False,  # one installer: `lora completion SHELL`
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback(epilog=examples.block("lora"))
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Your pictures or chat data to a LoRA that WebUI, ComfyUI, diffusers, transformers and llama.cpp load."""


def _register() -> None:
    """The command table, in the order of the main job. Command modules import nothing heavy."""
    from loracli.commands import (cache, caption, completion, demo, doctor, export, fetch, inspect,
                                  mirror, profile, resume, train)

    def command(name: str, function) -> None:
        app.command(name, epilog=examples.block(name))(function)

    command("demo", demo.demo)
    command("fetch", fetch.fetch)
    app.add_typer(mirror.app, name="mirror", epilog=examples.block("mirror"))
    app.add_typer(cache.app, name="cache", epilog=examples.block("cache"))
    command("caption", caption.caption)
    app.add_typer(profile.app, name="profile", epilog=examples.block("profile"))
    command("train", train.train)
    command("resume", resume.resume)
    command("export", export.export)
    command("inspect", inspect.inspect)
    command("doctor", doctor.doctor)
    command("completion", completion.completion)
    for group, sub in (("mirror", mirror.app), ("cache", cache.app), ("profile", profile.app)):
        examples.attach(group, sub)


_register()


def quiet_third_party_notices() -> None:
    """bitsandbytes (imported by peft when installed) logs a CPU-kernel notice nobody can act on."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def run(argv: list[str] | None = None) -> int:
    """Run `lora ARGS…` and return its exit status; every exception is mapped by `ERRORS`."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    as_json = "--json" in args
    quiet_third_party_notices()
    if "_LORA_COMPLETE" in os.environ:  # a <TAB> from the script `lora completion SHELL` printed
        from typer.completion import completion_init  # registers bash/zsh/fish (Typer < 0.30)

        completion_init()
    try:
        code = app(args=args, prog_name="lora", standalone_mode=False)
        if code == Interrupted.exit_code:  # Typer's answer to a KeyboardInterrupt it caught
            return _interrupted(None, as_json, args)
        return code if isinstance(code, int) else 0
    except SystemExit as e:  # a command that reported its own outcome (a run stopped by Ctrl+C)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the table's last row takes all
        handler = next(h for kinds, h in ERRORS if isinstance(e, kinds))
        return handler(e, as_json, args)


def main(argv: list[str] | None = None) -> None:
    """The `lora` console script."""
    sys.exit(run(argv))
