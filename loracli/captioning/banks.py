"""Label banks: TOML files of categories (medium, subject, style, …) that `lora caption` ranks.

A bank has optional `templates` and `neutral` defaults and `[[category]]` tables, each with a
`name`, `mode` (`single`: one answer; `multi`: several), `labels`, and the thresholds the
ranking in `loracli.captioning.captions` uses. Parsing is strict and reports every problem at once.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loracli.errors import LoraError

DEFAULT_TEMPLATES = ("{}", "an image of {}", "a picture showing {}")
DEFAULT_NEUTRAL = "an image"
BANK_KEYS = {"templates", "neutral", "category", "description"}
CATEGORY_KEYS = {"name", "mode", "labels", "threshold", "top_k", "margin", "templates", "neutral"}
MODES = ("single", "multi")


@dataclass(frozen=True)
class Category:
    """One question asked of every image (`single`: which one?; `multi`: which of these?)."""

    name: str
    labels: tuple[str, ...]
    mode: str = "single"
    threshold: float = 0.0  # single: the winner's minimum probability among the labels
    top_k: int = 3  # multi: at most this many labels
    margin: float = 0.0  # multi: cosine a label must beat the neutral baseline by
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    neutral: str = DEFAULT_NEUTRAL

    @property
    def multi(self) -> bool:
        return self.mode == "multi"


@dataclass(frozen=True)
class Bank:
    categories: tuple[Category, ...]
    sources: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return sum(len(c.labels) for c in self.categories)


# --- label banks -----------------------------------------------------------------------------

def builtin_dir() -> Path:
    return Path(__file__).parent / "labels"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


def load_bank(specs: Sequence[str] | None = None) -> Bank:
    """Read label banks: built-in names (`default`) or TOML files; categories are concatenated."""
    specs = list(specs or ["default"])
    categories: list[Category] = []
    seen: dict[str, str] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if not path.is_file():
            if spec in builtin_names():
                path = builtin_dir() / f"{spec}.toml"
            else:
                raise LoraError(f"label bank {spec!r}: no such file or built-in bank",
                                f"pass a .toml file, or one of: {', '.join(builtin_names())} "
                                f"(e.g. `--labels default`)")
        for cat in parse_bank(_read_toml(path), str(path)).categories:
            if cat.name in seen:
                raise LoraError(f"category {cat.name!r} is defined in both {seen[cat.name]} and "
                                f"{path}", "rename one of them, or drop one --labels")
            seen[cat.name] = str(path)
            categories.append(cat)
    return Bank(tuple(categories), tuple(specs))


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise LoraError(f"{path}: cannot read label bank ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise LoraError(f"{path}: not valid TOML ({e})", f"fix {path}, then rerun") from None


def parse_bank(data: dict, source: str = "<bank>") -> Bank:
    """Validate a bank's TOML data strictly; every problem is reported at once."""
    errors: list[str] = []
    _unknown(data, BANK_KEYS, "", errors)
    templates = _templates(data.get("templates", DEFAULT_TEMPLATES), "templates", errors)
    neutral = _string(data.get("neutral", DEFAULT_NEUTRAL), "neutral", errors)
    raw = data.get("category", [])
    if not isinstance(raw, list) or not raw:
        errors.append("category: needs at least one [[category]] table")
        raw = []
    categories, names = [], set()
    for i, c in enumerate(raw):
        where = f"category[{i}]"
        if not isinstance(c, dict):
            errors.append(f"{where}: must be a table")
            continue
        name = c.get("name")
        if not isinstance(name, str) or not name.strip():
            errors.append(f"{where}.name: required (a non-empty string)")
            name = f"#{i}"
        else:
            where = f"category {name!r}"
            if name in names:
                errors.append(f"{where}: defined twice")
            names.add(name)
        _unknown(c, CATEGORY_KEYS, f"{where}.", errors)
        mode = c.get("mode", "single")
        if mode not in MODES:
            errors.append(f"{where}.mode: {mode!r} is not one of {', '.join(MODES)}")
        labels = _labels(c.get("labels"), f"{where}.labels", errors)
        threshold = _number(c.get("threshold", 0.0), f"{where}.threshold", errors, 0.0, 1.0)
        margin = _number(c.get("margin", 0.0), f"{where}.margin", errors, -1.0, 1.0)
        top_k = c.get("top_k", 3)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            errors.append(f"{where}.top_k: must be a whole number >= 1, not {top_k!r}")
            top_k = 1
        cat_templates = _templates(c.get("templates", templates), f"{where}.templates", errors)
        cat_neutral = _string(c.get("neutral", neutral), f"{where}.neutral", errors)
        categories.append(Category(name, labels, mode, threshold, top_k, margin, cat_templates,
                                   cat_neutral))
    if errors:
        raise LoraError(f"{source}: invalid label bank ({len(errors)} problem(s))",
                        f"fix {source}, then rerun", details=errors)
    return Bank(tuple(categories), (source,))


def _unknown(table: dict, known: set[str], prefix: str, errors: list[str]) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            errors.append(f"{prefix}{key}: unknown key{hint}")


def _string(value, where: str, errors: list[str]) -> str:
    if not isinstance(value, str) or not value.strip():
        errors.append(f"{where}: must be a non-empty string")
        return DEFAULT_NEUTRAL
    return value.strip()


def _number(value, where: str, errors: list[str], low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        errors.append(f"{where}: must be a number from {low} to {high}, not {value!r}")
        return 0.0
    return float(value)


def _templates(value, where: str, errors: list[str]) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        errors.append(f"{where}: must be a non-empty list of strings holding {{}}")
        return DEFAULT_TEMPLATES
    bad = [t for t in value if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        errors.append(f"{where}: each template needs exactly one {{}} (bad: {bad[0]!r})")
        return DEFAULT_TEMPLATES
    return tuple(value)


def _labels(value, where: str, errors: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        errors.append(f"{where}: must be a non-empty list of strings")
        return ()
    labels: list[str] = []
    for label in value:
        if not isinstance(label, str) or not label.strip():
            errors.append(f"{where}: {label!r} is not a non-empty string")
        elif "," in label:
            errors.append(f"{where}: {label!r} holds a comma (commas separate tags in captions)")
        elif label.strip() in labels:
            errors.append(f"{where}: {label.strip()!r} is listed twice")
        else:
            labels.append(label.strip())
    return tuple(labels)
