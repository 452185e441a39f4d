"""Where models come from: built-in and user-defined mirrors, the default one, and fallbacks.

Two kinds of mirror:
- `hub`: speaks the Hugging Face API (huggingface.co, hf-mirror.com, a self-hosted olah, a company
  proxy): revision → commit sha, recursive file tree with sha256, `resolve` URLs with `Range`.
- `files`: plain files at `{url}/{org}/{name}/{path}` (TUNA's old `hugging-face-models` layout, or
  a tree written by `lora mirror sync --publish`). File list and sha256 come from
  `{url}/{org}/{name}/lora-manifest.json` when the mirror has one, else from the first hub mirror
  that answers.
A URL given where a name is expected is a mirror of kind `auto`: files-kind if it serves
`lora-mirror.json` at its root, hub otherwise.

Settings (`$LORA_HOME/config.toml`): `default_mirror`, `fallbacks` (default hf-mirror, then hf),
`[mirrors.NAME] url, kind`. `LORA_MIRROR` overrides the default for one shell.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

from loracli import settings
from loracli.errors import LoraError

KINDS = ("hub", "files")
DEFAULT_FALLBACKS = ("hf-mirror", "hf")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")


@dataclass(frozen=True)
class Mirror:
    name: str
    url: str
    kind: str  # hub | files | auto
    builtin: bool = False
    note: str = ""
    retired: str = ""  # when the mirror stopped serving models; fetches skip it

    def to_dict(self) -> dict:
        return asdict(self)


BUILTIN = {
    "hf": Mirror("hf", "https://huggingface.co", "hub", True, "Hugging Face (upstream)"),
    "hf-mirror": Mirror("hf-mirror", "https://hf-mirror.com", "hub", True,
                        "community reverse proxy of huggingface.co"),
    "tuna": Mirror("tuna", "https://mirrors.tuna.tsinghua.edu.cn/hugging-face-models", "files", True,
                   "TUNA (Tsinghua) plain files; no API, no revisions, no hashes",
                   retired="removed in August 2021; TUNA accepts no new Hugging Face mirror"),
}


def _check_url(url: str) -> str:
    url = url.strip()
    if not re.match(r"^https?://[^/\s]+", url):
        raise LoraError(f"{url!r} is not an http(s) URL",
                        "lora mirror add NAME https://host[/path] [--kind hub|files]")
    return url.rstrip("/")


def user_mirrors(config: dict | None = None) -> dict[str, Mirror]:
    config = settings.load() if config is None else config
    found = {}
    for name, spec in (config.get("mirrors") or {}).items():
        if isinstance(spec, dict) and spec.get("url"):
            found[name] = Mirror(name, str(spec["url"]).rstrip("/"), spec.get("kind", "hub"),
                                 False, spec.get("note", ""))
    return found


def all_mirrors() -> dict[str, Mirror]:
    return {**BUILTIN, **user_mirrors()}


def get(name_or_url: str) -> Mirror:
    """A mirror by name, or an ad-hoc one for an http(s) URL."""
    if name_or_url.startswith(("http://", "https://")):
        url = _check_url(name_or_url)
        return Mirror(url, url, "auto")
    known = all_mirrors()
    if name_or_url not in known:
        raise LoraError(f"unknown mirror {name_or_url!r} (known: {', '.join(known)})",
                        f"lora mirror add {name_or_url} https://… [--kind hub|files]")
    return known[name_or_url]


def default_name(config: dict | None = None) -> str:
    """`LORA_MIRROR`, else the configured default, else `hf`."""
    config = settings.load() if config is None else config
    return os.environ.get("LORA_MIRROR") or config.get("default_mirror") or "hf"


def fallbacks(config: dict | None = None) -> list[str]:
    config = settings.load() if config is None else config
    return list(config.get("fallbacks", DEFAULT_FALLBACKS))


def chain(chosen: str | None = None, strict: bool = False) -> list[Mirror]:
    """The mirrors to try, in order: the chosen (or default) one, then the fallbacks."""
    config = settings.load()
    first = get(chosen or default_name(config))
    if strict:
        return [first]
    order = [first]
    for name in fallbacks(config):
        m = get(name)
        if all(m.url != o.url for o in order):
            order.append(m)
    return order


def add(name: str, url: str, kind: str = "hub", force: bool = False) -> Mirror:
    if not _NAME_RE.match(name):
        raise LoraError(f"bad mirror name {name!r}: use lower-case letters, digits, '.', '_', '-'",
                        f"lora mirror add my-mirror {url}")
    if name in BUILTIN:
        raise LoraError(f"{name} is a built-in mirror", f"lora mirror add my-{name} {url}")
    if kind not in KINDS:
        raise LoraError(f"kind must be hub or files, not {kind!r}", f"lora mirror add {name} {url} --kind hub")
    mirror = Mirror(name, _check_url(url), kind)

    def change(data: dict) -> None:
        table = data.setdefault("mirrors", {})
        if name in table and not force and table[name].get("url") != mirror.url:
            raise LoraError(f"mirror {name} exists ({table[name].get('url')})",
                            f"lora mirror add {name} {url} --force   (or lora mirror remove {name})")
        table[name] = {"url": mirror.url, "kind": kind}

    settings.update(change)
    return mirror


def remove(name: str) -> Mirror:
    if name in BUILTIN:
        raise LoraError(f"{name} is built in and cannot be removed",
                        "lora mirror use NAME   (to choose another default)")
    mirror = get(name)

    def change(data: dict) -> None:
        data.get("mirrors", {}).pop(name, None)
        if data.get("default_mirror") == name:
            data.pop("default_mirror")
        if name in data.get("fallbacks", []):
            data["fallbacks"] = [f for f in data["fallbacks"] if f != name]

    settings.update(change)
    return mirror


def use(name: str) -> Mirror:
    """Make `name` (or a URL) the default mirror."""
    mirror = get(name)
    if mirror.retired:
        raise LoraError(f"{name} was retired ({mirror.retired})", "lora mirror use hf-mirror")
    settings.update(lambda data: data.__setitem__("default_mirror", name))
    return mirror


def listing() -> list[dict]:
    """Every mirror with its role, for `lora mirror list`."""
    config = settings.load()
    default = default_name(config)
    fb = fallbacks(config)
    rows = []
    for m in all_mirrors().values():
        role = "default" if m.name == default else f"fallback {fb.index(m.name) + 1}" if m.name in fb else ""
        status = f"retired: {m.retired}" if m.retired else m.note
        rows.append({**m.to_dict(), "role": role, "status": status})
    if default.startswith(("http://", "https://")):
        rows.append({**get(default).to_dict(), "role": "default", "status": "from LORA_MIRROR or config"})
    return rows
