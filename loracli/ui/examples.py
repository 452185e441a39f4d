"""The Examples block at the end of every command's `--help`, kept in one table.

Each entry is a few real command lines with a short comment; `block(name)` formats one for
click's help (a `\\b` paragraph, so the lines are printed as written, not re-wrapped).
"""

from __future__ import annotations

EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "lora": [("lora demo", "the whole job on a tiny offline model"),
             ("lora fetch sd15 --mirror hf-mirror", "a base model through a mirror"),
             ("lora train --profile my-style", "train; run it again to continue"),
             ("lora export my-style", "the LoRA file for WebUI / ComfyUI")],
    "demo": [("lora demo", "fetch, data, train, export, before/after grid"),
             ("lora demo -o /tmp/demo --steps 100", "a shorter run elsewhere"),
             ("lora demo --json", "where everything is, as JSON")],
    "fetch": [("lora fetch sd15", "an alias, through the default mirror"),
              ("lora fetch sdxl --mirror hf-mirror --timeout 10", "a mirror, leave it if it stalls"),
              ("lora fetch org/name@main --include 'unet/*' --dry-run", "what would be downloaded")],
    "caption": [("lora caption data/my_style --prefix 'sks style'", "caption files + metadata.csv"),
                ("lora caption data/my_style --dry-run", "print captions, write nothing"),
                ("lora caption data/my_style --existing overwrite --json", "redo, as JSON")],
    "train": [("lora train --profile my-style", "start, or continue an interrupted run"),
              ("lora train --config my.toml --set train.max_steps=200", "a file, one key changed"),
              ("lora train -p my-style --restart", "a new run; the old one is kept"),
              ("lora train -p my-style --processes 2", "two GPUs through accelerate")],
    "resume": [("lora resume my-style", "continue from the newest checkpoint"),
               ("lora resume output/my-style --steps 500", "train 500 steps longer"),
               ("lora resume output/my-style --until-step 2000", "train until step 2000")],
    "export": [("lora export my-style", "kohya .safetensors for WebUI / ComfyUI (fp16)"),
               ("lora export output/my-style --format diffusers --step 800", "another layout"),
               ("lora export my-style --format merged -o merged/", "a pipeline with it fused in")],
    "inspect": [("lora inspect output/my-style/my-style.safetensors", "format, rank, base"),
                ("lora inspect downloaded.safetensors --json", "as JSON")],
    "doctor": [("lora doctor", "versions, device, cache, mirror"),
               ("lora doctor --json", "the same, as JSON")],
    "completion": [("lora completion bash > ~/.lora-complete.bash", "then `source` it from ~/.bashrc"),
                   ("lora completion zsh > ~/.zfunc/_lora", "a folder on $fpath"),
                   ("lora completion fish > ~/.config/fish/completions/lora.fish", "fish")],
    "mirror": [("lora mirror list", "where models come from"),
               ("lora mirror use hf-mirror", "the default mirror"),
               ("lora mirror test", "which mirrors answer, how fast")],
    "cache": [("lora cache list", "what is cached"), ("lora cache verify", "re-hash it")],
    "profile": [("lora profile new my-style --from style", "a profile to edit"),
                ("lora profile validate my-style", "check it")],
    "mirror list": [("lora mirror list", "mirrors, the default and fallbacks"),
                    ("lora mirror list --json", "as JSON")],
    "mirror add": [("lora mirror add company https://hf.example.internal", "a hub-API mirror"),
                   ("lora mirror add tuna https://mirrors.example/hf --kind files", "plain files")],
    "mirror remove": [("lora mirror remove company", "forget one of your mirrors")],
    "mirror use": [("lora mirror use hf-mirror", "the default mirror from now on")],
    "mirror test": [("lora mirror test", "is each mirror reachable, does it serve a file"),
                    ("lora mirror test hf-mirror --timeout 5 --json", "one mirror, as JSON")],
    "mirror sync": [("lora mirror sync", "every tracked model to its current commit (cron)"),
                    ("lora mirror sync sd15 --wait --prune", "one model, queue, drop old files")],
    "mirror status": [("lora mirror status", "the last sync of each tracked model"),
                      ("lora mirror status --json", "as JSON")],
    "cache list": [("lora cache list", "models in the cache, size, commit"),
                   ("lora cache list --json", "as JSON")],
    "cache verify": [("lora cache verify", "re-hash every cached model"),
                     ("lora cache verify sd15 --json", "one model, as JSON")],
    "cache rm": [("lora cache rm sd15", "remove a model from the cache")],
    "profile list": [("lora profile list", "presets and your profiles")],
    "profile show": [("lora profile show anime", "the preset with its comments"),
                     ("lora profile show my-style --resolved --set train.max_steps=200",
                      "every key after --set")],
    "profile new": [("lora profile new my-style --from style", "a copy of a preset to edit")],
    "profile edit": [("lora profile edit my-style", "open it in $EDITOR, then validate")],
    "profile validate": [("lora profile validate my-style", "every problem at once"),
                         ("lora profile validate ./my.toml --json", "a file, as JSON")],
    "profile path": [("lora profile path my-style", "where the file is")],
    "profile rm": [("lora profile rm my-style", "delete one of your profiles")],
}


def block(name: str) -> str | None:
    """The Examples paragraph for `name` ("train", "mirror sync"), or None when there is none."""
    rows = EXAMPLES.get(name)
    if not rows:
        return None
    lines = [f"  # {why}\n  {cmd}" for cmd, why in rows]
    return "\b\nExamples:\n" + "\n".join(lines)


def attach(group: str, sub_app) -> None:
    """Give each command of a sub-app (`lora mirror …`) its Examples, unless it declared some."""
    for info in sub_app.registered_commands:
        name = info.name or info.callback.__name__.rstrip("_").replace("_", "-")
        if not info.epilog:
            info.epilog = block(f"{group} {name}")
