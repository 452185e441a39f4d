"""What a mirror says a model is: its commit and file list, checked before anything is written.

A hub mirror answers `/api/models/{repo}/revision/{rev}` (the commit) and the recursive tree (paths,
sizes, git oids, LFS sha256); a files-kind mirror may publish `lora-manifest.json` instead. Every
name in those answers is checked (`hubcache`: commit 40 hex, path rules, sha256 64 hex, git oid
40 hex; no path listed twice or both as a file and a folder); an answer that fails is refused as a
whole with a `MirrorError` (state `unsafe` or `bad-answer`), and the next mirror is asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from loracli.hub import hubcache, models
from loracli.hub.download import Events, RemoteFile
from loracli.hub.mirrors import Mirror
from loracli.hub.transport import Client, MirrorError

MAX_PAGES = 10_000  # a file list longer than this is a mirror answering in circles
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".h5")


@dataclass
class Listing:
    repo_id: str
    revision: str
    commit: str
    files: list[RemoteFile]
    source: Mirror


def _bad(client: Client, message: str, state: str = "bad-answer") -> MirrorError:
    return MirrorError(client.clean(message), True, state)


def files_from_tree(client: Client, entries) -> list[RemoteFile]:
    """The files of a tree answer, every name checked; `MirrorError` when one is unsafe."""
    if not isinstance(entries, list):
        raise _bad(client, "the file list is not a list")
    files, folders = {}, set()
    try:
        for e in entries:
            if not isinstance(e, dict):
                raise _bad(client, "a file list entry is not an object")
            if e.get("type") != "file":
                continue
            path = hubcache.check_rel_path(e.get("path"))
            lfs = e.get("lfs") if isinstance(e.get("lfs"), dict) else {}
            sha256 = lfs.get("oid")
            if sha256 is not None and not hubcache.SHA256_RE.match(str(sha256).lower()):
                raise hubcache.BadName(f"LFS oid '{hubcache.shown(sha256)}' of {path} is not a sha256 "
                                       "(64 hex)")
            oid = e.get("oid")
            if oid is not None and not hubcache.SHA1_RE.match(str(oid).lower()):
                raise hubcache.BadName(f"git oid '{hubcache.shown(oid)}' of {path} is not a sha1 (40 hex)")
            if not (sha256 or oid):
                raise _bad(client, f"no sha256 or git oid listed for {path}: it could not be verified")
            size = e.get("size", lfs.get("size"))
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise _bad(client, f"size {size!r} of {path} is not a byte count")
            if path in files:
                raise _bad(client, f"{path} is listed twice")
            files[path] = RemoteFile(path, size, sha256 and sha256.lower(), oid and oid.lower())
            parts = path.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    except hubcache.BadName as err:
        raise _bad(client, err.message, "unsafe") from None
    clash = sorted(folders & set(files))
    if clash:
        raise _bad(client, f"{clash[0]} is listed both as a file and as a folder", "unsafe")
    return list(files.values())


def list_hub(client: Client, mirror: Mirror, ref: models.ModelRef) -> Listing:
    rev = quote(ref.revision, safe="")
    info, _ = client.get_json(mirror, f"{mirror.url}/api/models/{ref.repo_id}/revision/{rev}")
    try:
        commit = hubcache.check_commit(info.get("sha") if isinstance(info, dict) else None)
    except hubcache.BadName as err:
        raise _bad(client, f"revision answer: {err.message}", "unsafe") from None
    tree = f"/api/models/{ref.repo_id}/tree/{commit}"
    url = f"{mirror.url}{tree}?recursive=true&expand=false"
    entries: list = []
    seen: set[str] = set()
    while url:
        if url in seen or len(seen) >= MAX_PAGES:
            raise _bad(client, f"the file list's pages never end (page {len(seen) + 1} is "
                               f"{url[:80]})")
        seen.add(url)
        page, headers = client.get_json(mirror, url)
        if not isinstance(page, list):
            raise _bad(client, "the file list is not a list")
        entries.extend(page)
        url = _next_page(mirror.url, tree, headers.get("Link", ""), client)
    return Listing(ref.repo_id, ref.revision, commit, files_from_tree(client, entries), mirror)


def _next_page(base: str, tree: str, link: str, client: Client) -> str | None:
    """The next page's URL, asked of the same mirror: a mirror that copies the upstream's Link
    header names huggingface.co, which is the host a blocked network cannot reach, so a link to
    this same tree listing elsewhere is re-based onto the mirror; a link anywhere else is refused
    (the token would go with it)."""
    url = _next_link(link)
    if not url or url.startswith(base + "/"):
        return url
    parts = urlsplit(url)
    if parts.path == tree:
        return f"{base}{tree}" + (f"?{parts.query}" if parts.query else "")
    raise _bad(client, f"the next page of the file list is on another server ({url[:80]})",
               "unsafe")


def _next_link(link: str) -> str | None:
    for part in link.split(","):
        if 'rel="next"' in part and "<" in part and ">" in part:
            return part[part.index("<") + 1 : part.index(">")]
    return None


def list_files_mirror(client: Client, mirror: Mirror, ref: models.ModelRef) -> Listing | None:
    """From `{url}/{repo}/lora-manifest.json`; None when the mirror has no manifest."""
    try:
        data, _ = client.get_json(mirror, f"{mirror.url}/{ref.repo_id}/lora-manifest.json")
    except MirrorError as e:
        if str(e).startswith("HTTP 404"):
            return None
        raise
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise _bad(client, "lora-manifest.json has no file list")
    try:
        commit = hubcache.check_commit(data.get("commit"))
    except hubcache.BadName as err:
        raise _bad(client, f"lora-manifest.json: {err.message}", "unsafe") from None
    if ref.revision not in (data.get("revision", "main"), commit):
        raise _bad(client, f"serves {data.get('revision', 'main')} ({commit[:7]}) only, not {ref.revision}")
    entries = []
    for f in data["files"]:
        if not isinstance(f, dict):
            raise _bad(client, "a lora-manifest.json entry is not an object")
        lfs = f.get("sha256") and (f.get("lfs", True) or not f.get("oid"))
        entries.append({"type": "file", "path": f.get("path"), "size": f.get("size"),
                        "oid": f.get("oid"), "lfs": {"oid": f["sha256"]} if lfs else None})
    return Listing(ref.repo_id, ref.revision, commit, files_from_tree(client, entries), mirror)


def find(client: Client, ref: models.ModelRef, chain: list[Mirror], event: Events):
    """Ask each mirror in order; returns (listing, the mirrors left to download from, reasons)."""
    reasons, sources = [], []
    for i, mirror in enumerate(chain):
        nxt = chain[i + 1].name if i + 1 < len(chain) else None
        if mirror.retired or mirror.url in client.down:
            why = f"retired ({mirror.retired})" if mirror.retired else client.down[mirror.url]
            reasons.append(f"{mirror.name}: {why}")
            event({"event": "fallback", "mirror": mirror.name, "next": nxt, "reason": why})
            continue
        try:
            if client.kind(mirror) == "files":
                listing = list_files_mirror(client, mirror, ref)
                sources.append(mirror)
                if listing is None:  # bytes only: the list and hashes come from a hub mirror
                    event({"event": "note", "message": f"{mirror.name} has no manifest; "
                           "taking the file list and sha256 from the next hub mirror"})
                    continue
            else:
                listing = list_hub(client, mirror, ref)
                sources.append(mirror)
            sources += [m for m in chain[i + 1:] if not m.retired and m not in sources]
            return listing, sources, reasons
        except MirrorError as e:
            reasons.append(f"{mirror.name}: {e}")
            if mirror in sources:
                sources.remove(mirror)
            event({"event": "fallback", "mirror": mirror.name, "next": nxt, "reason": str(e)})
    return None, sources, reasons


def variant_of(path: str) -> str | None:
    """`unet/diffusion_pytorch_model.fp16.safetensors` → fp16 (also for `.index.fp16.json`)."""
    parts = path.rsplit("/", 1)[-1].split(".")
    if len(parts) >= 3 and parts[-1] in {s[1:] for s in WEIGHT_SUFFIXES}:
        return parts[-2]
    if len(parts) >= 4 and parts[-1] == "json" and parts[-3] == "index":
        return parts[-2]
    return None


def select(files: list[RemoteFile], include, exclude=(), variant: str | None = None) -> list[RemoteFile]:
    """The files a fetch takes: matching `include`, not `exclude`, and the weights of one variant
    (per folder, `variant` files where there are some, the plain ones otherwise)."""
    chosen = [f for f in files if models.matches(f.path, include, exclude)]
    with_variant = {f.path.rpartition("/")[0] for f in chosen if variant and variant_of(f.path) == variant}
    keep = []
    for f in chosen:
        v = variant_of(f.path)
        folder = f.path.rpartition("/")[0]
        if v is None and not (folder in with_variant and _is_weight(f.path)):
            keep.append(f)
        elif v is not None and v == variant:
            keep.append(f)
    return keep


def _is_weight(path: str) -> bool:
    return path.endswith(WEIGHT_SUFFIXES) or path.endswith(".index.json")

