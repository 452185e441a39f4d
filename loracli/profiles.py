"""The profile store: presets shipped with the package, your profiles in `$LORA_HOME/profiles`,
profile files given by path, and `--set` overrides applied on top.

A profile is named (`anime`, `my-style`) or given as a `.toml`/`.yaml` file. Every name goes
through `check_name` before it becomes a path, and every path built from a name must resolve
inside the profiles folder, so `lora profile rm ../../victim` cannot reach outside it. The schema
(dataclasses, strict parsing) is `loracli.profile_schema`; its names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from loracli import paths
from loracli.errors import LoraError
from loracli.profile_schema import (SECTIONS, Profile, ProfileError, all_keys,  # noqa: F401 (API)
                                    check_value, key_docs, parse, suggest)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SUFFIXES = (".toml", ".yaml", ".yml")


# ---------------------------------------------------------------- reading files


def decode(raw: bytes, source: str) -> str:
    """Text of a profile saved by any editor: UTF-8 (with or without BOM), UTF-16, or GBK."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf8_error = e
    try:
        return raw.decode("gb18030")
    except UnicodeDecodeError:
        raise LoraError(
            f"{source}: not UTF-8 text (byte {utf8_error.start} cannot be decoded)",
            "save the file as UTF-8 in your editor (\"Save with encoding\" → UTF-8)") from None


def _folder_error(path: Path) -> LoraError:
    if (path / "profile.toml").is_file():
        hint = (f"that is a run folder: `lora resume {path}` continues it; its profile is "
                f"{path / 'profile.toml'}")
    else:
        hint = (f"pass a profile file inside it, e.g. {path / 'profile.toml'}, or a profile "
                "name from `lora profile list`")
    return LoraError(f"{path}: is a folder, not a profile file", hint)


def read_mapping(path: Path) -> dict:
    """Load a profile file (TOML, or YAML for .yaml/.yml) into a plain dict."""
    path = Path(path)
    if path.is_dir():
        raise _folder_error(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LoraError(f"{path}: no such profile file", "`lora profile list` shows the profiles") from None
    except OSError as e:
        raise LoraError(f"{path}: cannot read it ({e.strerror})",
                        "check the path and its permissions") from None
    text = decode(raw, str(path))
    if path.suffix.lower() in (".yaml", ".yml"):
        return _read_yaml(text, path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LoraError(f"{path}: invalid TOML: {e}",
                        "check quotes and brackets on that line; strings need \"double quotes\"") from None


def _read_yaml(text: str, path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (at line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise LoraError(f"{path}: invalid YAML: {getattr(e, 'problem', e)}{where}",
                        "check the indentation on that line (spaces, not tabs)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LoraError(f"{path}: a profile must be a mapping of sections, got "
                        f"{type(data).__name__}", "see `lora profile show default` for the layout")
    return data


# ---------------------------------------------------------------- names and where they live


def preset_dir() -> Path:
    return Path(str(resources.files("loracli") / "presets"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.toml"))


def preset_text(name: str) -> str:
    return (preset_dir() / f"{check_name(name)}.toml").read_text("utf-8")


def user_names() -> list[str]:
    d = paths.profiles_dir()
    return sorted(p.stem for p in d.glob("*.toml") if NAME_RE.match(p.stem)) if d.is_dir() else []


def names() -> list[str]:
    return sorted(set(preset_names()) | set(user_names()))


def check_name(name: str) -> str:
    """A profile name is a plain word: letters, digits, '.', '_', '-', no path separator."""
    if not NAME_RE.match(name) or name.endswith(SUFFIXES):
        raise LoraError(f"invalid profile name {name!r}",
                        "use letters, digits, '.', '_' and '-' (e.g. my-style); "
                        "`lora profile list` shows the profiles")
    return name


def user_file(name: str) -> Path:
    """`$LORA_HOME/profiles/NAME.toml`, for a checked name that stays inside that folder."""
    root = paths.profiles_dir()
    target = root / f"{check_name(name)}.toml"
    if target.parent.resolve() != root.resolve():
        raise LoraError(f"invalid profile name {name!r}: it leads outside {root}",
                        "use a plain name such as my-style")
    return target


def looks_like_path(arg: str) -> bool:
    return arg.lower().endswith(SUFFIXES) or any(c in arg for c in "/\\") or arg.startswith("~")


def locate(name_or_path: str) -> tuple[str, Path | None]:
    """`(name, path)` of a profile: a file path, a user profile, or a built-in preset (path None)."""
    if looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            raise _folder_error(path)
        if path.suffix.lower() not in SUFFIXES:
            raise LoraError(f"{name_or_path}: not a profile (a profile is a name or a "
                            ".toml/.yaml file)", "`lora profile list` shows the profiles")
        return path.stem, path
    user = user_file(name_or_path)
    if user.is_file():
        return name_or_path, user
    if name_or_path in preset_names():
        return name_or_path, None
    match = difflib.get_close_matches(name_or_path, names(), n=1, cutoff=0.5)
    hint = f"did you mean `{match[0]}`? " if match else ""
    raise LoraError(f"no profile named {name_or_path!r}",
                    hint + f"`lora profile list` shows them; `lora profile new {name_or_path}` creates it")


def raw_text(name_or_path: str) -> str:
    name, path = locate(name_or_path)
    if path is None:
        return preset_text(name)
    if not path.is_file():
        raise LoraError(f"{path}: no such profile file", "`lora profile list` shows the profiles")
    return decode(path.read_bytes(), str(path))


def load_mapping(name_or_path: str) -> tuple[str, dict, str]:
    """`(name, mapping, source)` for a profile name or path, before validation."""
    name, path = locate(name_or_path)
    if path is None:
        return name, tomllib.loads(preset_text(name)), f"preset {name}"
    return name, read_mapping(path), str(path)


# ---------------------------------------------------------------- --set overrides


class OverrideError(ProfileError):
    """A bad `--set`: malformed, an unknown key, or a value the key does not accept (exit 2)."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        super().__init__("--set", problems,
                         "write --set SECTION.KEY=VALUE with a key from `lora profile show "
                         "default --resolved`, e.g. --set train.max_steps=200")
        if len(problems) == 1:  # one bad --set is the whole message
            self.message, self.details = problems[0], []
        else:
            self.message = f"--set: {len(problems)} bad overrides"
        self.args = (self.message,)


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`train.max_steps=200` → (["train", "max_steps"], 200). Values are TOML; bare words are strings."""
    key, sep, value = assignment.partition("=")
    key = key.strip()
    if not sep or not key or key.count(".") != 1:
        raise OverrideError([f"--set {assignment!r}: expected SECTION.KEY=VALUE, "
                             "for example --set train.max_steps=200"])
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.split("."), parsed


def check_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """`{section: {key: value}}` from `--set` assignments; raises `OverrideError` naming each
    malformed one, unknown key or rejected value, all at once."""
    problems: list[str] = []
    out: dict[str, dict[str, Any]] = {}
    keys = all_keys()
    for assignment in overrides:
        try:
            (section, key), value = parse_override(assignment)
        except OverrideError as e:
            problems += e.problems
            continue
        dotted = f"{section}.{key}"
        if dotted not in keys:
            problems.append(f"--set {dotted}: unknown key" + suggest(dotted, keys))
            continue
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        before = len(problems)
        checked = check_value(dotted, fields[key], value, problems)
        if len(problems) > before:
            problems[before:] = [f"--set {p}" for p in problems[before:]]
        elif checked is not None:
            out.setdefault(section, {})[key] = checked
    if problems:
        raise OverrideError(problems)
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`data` with every `--set` applied; a bad `--set` raises `OverrideError` (exit 2)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, values in check_overrides(overrides).items():
        if not isinstance(out.setdefault(section, {}), dict):
            out[section] = {}
        out[section].update(values)
    return out


def load(name_or_path: str = "default", overrides: list[str] | None = None) -> Profile:
    """Resolve, read, override and validate a profile."""
    name, data, source = load_mapping(name_or_path)
    data = apply_overrides(data, overrides or [])
    return parse(data, name=name, source=source)


def load_file(path: Path, overrides: list[str] | None = None) -> Profile:
    """A profile given as a file (`lora train --config PATH`), never read as a name."""
    path = Path(path).expanduser()
    data = apply_overrides(read_mapping(path), overrides or [])
    return parse(data, name=path.stem, source=str(path))


# ---------------------------------------------------------------- your profiles


def create(name: str, from_preset: str = "default", force: bool = False) -> Path:
    """Copy a preset (with its comments) to `$LORA_HOME/profiles/NAME.toml`."""
    target = user_file(name)
    if target.exists() and not force:
        raise LoraError(f"profile {name!r} already exists at {target}",
                        f"`lora profile edit {name}` changes it; add --force to start over")
    text = raw_text(from_preset)
    from loracli import atomic

    atomic.write_text(target, text)
    return target


def remove(name: str) -> Path:
    target = user_file(name)
    if not target.is_file():
        if name in preset_names():
            raise LoraError(f"{name!r} is a built-in preset and cannot be removed",
                            f"`lora profile new my-{name} --from {name}` makes an editable copy")
        raise LoraError(f"no user profile named {name!r}", "`lora profile list` shows them")
    target.unlink()
    return target
