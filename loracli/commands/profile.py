"""`lora profile …`: the TOML profile store."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import typer

from loracli.errors import LoraError
from loracli.ui import completers, output
from loracli.ui.options import JsonOpt, ProfileNameArg, ProfileOrFileArg, SetOpt

app = typer.Typer(help="Training profiles: list, show, create, edit, validate.", no_args_is_help=True)


def _description(name: str, path) -> str:
    from loracli import profiles

    text = profiles.preset_text(name) if path is None else path.read_text("utf-8", "replace")
    first = text.lstrip("\ufeff").splitlines()[0] if text.strip() else ""
    return first.split("—", 1)[-1].strip() if first.startswith("#") else ""


@app.command("list")
def list_(json: JsonOpt = False) -> None:
    """List built-in presets and your profiles."""
    from loracli import profiles

    rows = []
    user = set(profiles.user_names())
    for name in profiles.names():
        path = profiles.user_file(name) if name in user else None
        kind = "user" if path else "preset"
        if path and name in profiles.preset_names():
            kind = "user (shadows preset)"
        rows.append({"name": name, "kind": kind, "path": str(path or ""),
                     "description": _description(name, path)})
    output.emit(rows, json, lambda r: output.table(r, ["name", "kind", "description"]))


@app.command()
def show(
    name: ProfileOrFileArg,
    resolved: bool = typer.Option(False, "--resolved", help="Every key after defaults and --set."),
    set_: SetOpt = None,
    json: JsonOpt = False,
) -> None:
    """Print a profile (the file with its comments, or --resolved values)."""
    from loracli import profiles

    if json or resolved or set_:
        profile = profiles.load(name, set_ or [])
        output.emit(profile.to_dict(), json, lambda _: print(profile.to_toml(), end=""))
    else:
        print(profiles.raw_text(name), end="")


@app.command()
def new(
    name: ProfileNameArg,
    from_: str = typer.Option("default", "--from", help="Preset or profile to copy.",
                              autocompletion=completers.profile_names),
    force: bool = typer.Option(False, "--force", help="Replace an existing profile."),
    json: JsonOpt = False,
) -> None:
    """Create a profile from a preset, comments included."""
    from loracli import profiles

    path = profiles.create(name, from_, force=force)
    output.note(f"created profile {name} from {from_}; edit it with `lora profile edit {name}`")
    output.emit({"name": name, "path": str(path)}, json, lambda r: print(r["path"]))


@app.command()
def edit(name: ProfileNameArg) -> None:
    """Open a profile in $VISUAL/$EDITOR, then validate it."""
    from loracli import profiles

    target = profiles.user_file(name)
    if not target.is_file():
        source = name if name in profiles.names() else "default"
        profiles.create(name, source)
        output.note(f"created {target} from {source}")
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or _default_editor()
    try:
        code = subprocess.call([*shlex.split(editor), str(target)])
    except FileNotFoundError:
        raise LoraError(f"editor {editor!r} not found",
                        "set EDITOR, e.g. `export EDITOR=nano`") from None
    if code != 0:
        raise LoraError(f"editor exited with status {code}; {target} kept as it is")
    profiles.load_file(target)
    output.note(f"{name}: valid")


def _default_editor() -> str:
    for candidate in ("nano", "vim", "vi", "notepad"):
        if shutil.which(candidate):
            return candidate
    raise LoraError("no editor found", "set EDITOR, e.g. `export EDITOR=nano`")


@app.command()
def validate(
    name_or_path: ProfileOrFileArg,
    set_: SetOpt = None,
    json: JsonOpt = False,
) -> None:
    """Check a profile strictly; list every problem at once."""
    from loracli import profiles

    profile = profiles.load(name_or_path, set_ or [])
    output.emit({"name": profile.name, "valid": True, "profile": profile.to_dict()}, json,
                lambda _: print(f"{name_or_path}: valid"))


@app.command()
def path(name: ProfileNameArg, json: JsonOpt = False) -> None:
    """Print where a profile's file is."""
    from loracli import profiles

    found, file = profiles.locate(profiles.check_name(name))
    where = file or (profiles.preset_dir() / f"{found}.toml")
    output.emit({"name": found, "path": str(where), "preset": file is None}, json,
                lambda r: print(r["path"]))


@app.command()
def rm(name: ProfileNameArg, json: JsonOpt = False) -> None:
    """Delete one of your profiles (presets cannot be deleted)."""
    from loracli import profiles

    removed = profiles.remove(name)
    output.note(f"removed {removed}")
    output.emit({"name": name, "path": str(removed)}, json, lambda r: None)
