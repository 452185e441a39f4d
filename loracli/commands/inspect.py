"""`lora inspect FILE`: format, ranks, alphas, base model and metadata of any LoRA file."""

from __future__ import annotations


from loracli.ui import output
from loracli.ui.options import JsonOpt, LoraFileArg


def inspect(
    file: LoraFileArg,
    json: JsonOpt = False,
) -> None:
    """Show what a LoRA file holds: format, rank, alpha, base model, modules, metadata."""
    from loracli.exporting import compat, inspection

    report = inspection.inspect_lora(file)
    output.emit(report, json, _render)
    if not json:
        for line in compat.warnings(report["compatibility"]):
            output.warn(line)


def _base(report: dict) -> str:
    """The base model version, and the base a peft adapter records (an LLM's repo id)."""
    version, recorded = report["base_model_version"], report.get("base_model") or ""
    if not recorded or recorded == version:
        return version
    return recorded if version == "unknown" else f"{version} ({recorded})"


def _render(report: dict) -> None:
    meta = report["metadata"]
    rows = [
        ("file", report["path"]),
        ("format", report["format"]),
        ("base model", _base(report)),
        ("name", report["name"] or "-"),
        ("modules", ", ".join(f"{c} {n}" for c, n in report["modules"].items())),
        ("rank", ", ".join(map(str, report["ranks"]))),
        ("alpha", ", ".join(f"{a:g}" for a in report["alphas"])),
        ("kind", ", ".join(f"{k} {n}" for k, n in report["kinds"].items())),
        ("dtype", ", ".join(report["dtypes"])),
        ("trigger words", ", ".join(report["trigger_words"]) or "-"),
    ]
    for key in ("ss_steps", "ss_learning_rate", "ss_resolution", "ss_sd_model_name",
                "loracli.base_commit", "sshs_model_hash"):
        if key in meta:
            rows.append((key, meta[key]))
    if isinstance(meta.get("ss_tag_frequency"), dict):
        tags = {}
        for folder in meta["ss_tag_frequency"].values():
            for tag, n in folder.items():
                tags[tag] = tags.get(tag, 0) + n
        top = sorted(tags.items(), key=lambda t: -t[1])[:10]
        rows.append(("top tags", ", ".join(f"{t} ({n})" for t, n in top)))
    for row in report["compatibility"]:
        rows.append((row["label"], f"{row['applied']} of {row['total']} modules applied"
                     + (" (will not load)" if row["error"] else "")))
    output.table([{"field": k, "value": v} for k, v in rows], ["field", "value"])
