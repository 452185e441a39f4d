"""The `lora` command: a table of subcommands, and the one place errors become exit codes.

Nothing heavy is imported here: `lora --help` and shell completion must stay fast. Each command
module imports torch/diffusers/huggingface_hub inside the function that needs them.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer
from typer.core import TyperGroup

from loracli import __version__
from loracli.errors import LoraError


class LoraGroup(TyperGroup):
    """Maps every `LoraError` to `error:`/`hint:` on stderr and its exit code (1, or 2 for busy)."""

    def parse_args(self, ctx, args):
        ctx.meta["lora.json"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LoraError as e:
            report(e, as_json=ctx.meta.get("lora.json", False))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # `lora … | head`: the reader left; stop quietly, as Unix tools do on SIGPIPE
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence
            if type(e).__module__.startswith(("typer", "click")):
                raise  # usage errors and exits: Typer prints them (exit 2 for usage)
            if os.environ.get("LORA_DEBUG"):
                traceback.print_exc()
            report(LoraError(f"internal error: {type(e).__name__}: {e}",
                             "rerun with LORA_DEBUG=1 to see the traceback, and report it"),
                   as_json=ctx.meta.get("lora.json", False))
            raise typer.Exit(1) from None


def report(error: LoraError, as_json: bool = False) -> None:
    if os.environ.get("LORA_DEBUG") and error.__traceback__ is not None:
        traceback.print_exception(error)
    print(f"error: {error.message}", file=sys.stderr)
    for line in error.details:
        print(f"  {line}", file=sys.stderr)
    if error.hint:
        print(f"hint: {error.hint}", file=sys.stderr)
    if as_json:
        import json

        print(json.dumps(error.to_dict(), indent=2, ensure_ascii=False))


def _version(value: bool) -> None:
    if value:
        print(f"lora {__version__}")
        raise typer.Exit()


app = typer.Typer(
    cls=LoraGroup,
    name="lora",
    help="From a folder of pictures to a LoRA that WebUI, ComfyUI and diffusers load.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """From a folder of pictures to a LoRA that WebUI, ComfyUI and diffusers load."""


def _register() -> None:
    """The command table, in the order of the main job. Command modules import nothing heavy."""
    from loracli.commands import (cache, caption, completion, demo, doctor, export, fetch,
                                  inspect, mirror, profile, resume, train)

    app.command("demo")(demo.demo)
    app.command("fetch")(fetch.fetch)
    app.add_typer(mirror.app, name="mirror")
    app.add_typer(cache.app, name="cache")
    app.command("caption")(caption.caption)
    app.add_typer(profile.app, name="profile")
    app.command("train")(train.train)
    app.command("resume")(resume.resume)
    app.command("export")(export.export)
    app.command("inspect")(inspect.inspect)
    app.command("doctor")(doctor.doctor)
    app.command("completion")(completion.completion)


_register()


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="lora")
