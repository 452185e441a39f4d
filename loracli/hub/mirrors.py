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

The fallback order is a list the user sets: `lora mirror use A B C` (`mirror_order` in
`$LORA_HOME/config.toml`, beside `[mirrors.NAME] url, kind`), or `LORA_MIRROR=A,B,C` for one
shell. With no choice made, the first fetch tries every mirror at once, keeps the fastest that
answers first, and remembers that order (`state_dir()/mirror-choice.json`).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass

from loracli import paths, settings
from loracli.errors import LoraError

KINDS = ("hub", "files")
DEFAULT_ORDER = ("hf-mirror", "hf")  # what the README promises
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


def names() -> list[str]:
    """Every mirror name (built-in and yours). Cheap and quiet: for shell completion."""
    try:
        return list(all_mirrors())
    except Exception:  # a broken config must not break completion
        return list(BUILTIN)


def offline() -> bool:
    """`HF_HUB_OFFLINE` set: no mirror may be asked (the one place this is parsed)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _configured(config: dict) -> list[str] | None:
    if "mirror_order" in config:
        return [str(n) for n in config.get("mirror_order") or []]
    if "default_mirror" in config or "fallbacks" in config:  # the keys earlier versions wrote
        first = [config["default_mirror"]] if config.get("default_mirror") else []
        return list(dict.fromkeys(first + list(config.get("fallbacks", DEFAULT_ORDER))))
    return None


def choice_file():
    return paths.state_dir() / "mirror-choice.json"


def remembered() -> dict | None:
    """The order the first fetch chose by trying every mirror ({order, at}), or None."""
    try:
        data = json.loads(choice_file().read_text("utf-8"))
    except (OSError, ValueError):
        return None
    order = data.get("order") if isinstance(data, dict) else None
    return data if isinstance(order, list) and order else None


def remember(order: list[str]) -> None:
    from loracli import atomic

    atomic.write_json(choice_file(), {"order": order,
                                      "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def order(config: dict | None = None) -> tuple[list[str], str]:
    """The fallback order (names or URLs) and who set it: `LORA_MIRROR` (comma-separated),
    `lora mirror use`, the fastest found by the first fetch, or "" (nothing chosen yet)."""
    env = [n.strip() for n in os.environ.get("LORA_MIRROR", "").split(",") if n.strip()]
    if env:
        return env, "LORA_MIRROR"
    config = settings.load() if config is None else config
    configured = _configured(config)
    if configured is not None:
        return configured, "lora mirror use"
    found = remembered()
    if found:
        return [str(n) for n in found["order"]], f"fastest answer on {found.get('at', '?')}"
    return list(DEFAULT_ORDER), ""


def default_name(config: dict | None = None) -> str:
    """The first mirror of the order."""
    names_, _ = order(config)
    return names_[0] if names_ else DEFAULT_ORDER[0]


def summary() -> str:
    """One line for `lora doctor`: the order and who set it."""
    names_, source = order()
    how = (f"set by {source}" if source in ("LORA_MIRROR", "lora mirror use") else source
           or "not chosen yet: the first fetch tries them all and keeps the fastest")
    return f"{' → '.join(names_) or 'none'} ({how})"


def candidates() -> list[Mirror]:
    """What a first fetch tries, in parallel: every mirror that is not retired."""
    known = all_mirrors()
    first = [known[n] for n in DEFAULT_ORDER if n in known]
    return [m for m in first + [m for m in known.values() if m not in first] if not m.retired]


def chain(chosen: str | None = None, strict: bool = False) -> list[Mirror]:
    """The mirrors to try, in order: the chosen one (`--mirror`), then the fallback order."""
    names_, source = order()
    if source.startswith("fastest"):  # a mirror removed since the race is simply left out
        known = all_mirrors()
        names_ = [n for n in names_ if n in known or n.startswith(("http://", "https://"))]
    picked = [get(n) for n in ([chosen] if chosen else []) + names_]
    result: list[Mirror] = []
    for m in picked:
        if all(m.url != o.url for o in result):
            result.append(m)
    return result[:1] if strict else result


def needs_probe(chosen: str | None = None) -> bool:
    """Nothing chosen: no `--mirror`, no `LORA_MIRROR`, no `lora mirror use`, no earlier probe."""
    return not chosen and order()[1] == ""


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
                        "lora mirror use NAME…   (to choose the order)")
    mirror = get(name)

    def change(data: dict) -> None:
        data.get("mirrors", {}).pop(name, None)
        if data.get("default_mirror") == name:
            data.pop("default_mirror")
        for key in ("fallbacks", "mirror_order"):
            if name in data.get(key, []):
                data[key] = [f for f in data[key] if f != name]

    settings.update(change)
    return mirror


def use(names_: list[str]) -> list[Mirror]:
    """Make `names_` (names or URLs) the fallback order, first one first."""
    if not names_:
        raise LoraError("name at least one mirror", "lora mirror use hf-mirror hf")
    chosen = [get(n) for n in names_]
    for m in chosen:
        if m.retired:
            raise LoraError(f"{m.name} was retired ({m.retired})",
                            "lora mirror use " + (" ".join(n for n in names_ if n != m.name) or "hf-mirror"))
    order_ = list(dict.fromkeys(names_))

    def change(data: dict) -> None:
        data.pop("default_mirror", None)
        data.pop("fallbacks", None)
        data["mirror_order"] = order_

    settings.update(change)
    return chosen


def listing() -> list[dict]:
    """Every mirror with its place in the order (`role`: default, fallback N), for `mirror list`."""
    names_, source = order()
    rows = []
    seen = set()
    for m in list(all_mirrors().values()) + [get(n) for n in names_ if n.startswith(("http://", "https://"))]:
        if m.name in seen:
            continue
        seen.add(m.name)
        pos = names_.index(m.name) if m.name in names_ else None
        role = "" if pos is None else "default" if pos == 0 else f"fallback {pos}"
        status = f"retired: {m.retired}" if m.retired else m.note or "your mirror"
        rows.append({**m.to_dict(), "role": role, "order": None if pos is None else pos + 1,
                     "order_set_by": source or "nothing yet (the first fetch picks the fastest)",
                     "status": status})
    return sorted(rows, key=lambda r: (r["order"] is None, r["order"] or 0))
