"""Published dictionaries by hub id: `hf://OWNER/REPO[/SUBFOLDER]`, `hf://OWNER/REPO/FILE.pt`
or `hf://OWNER/REPO/ARCHIVE.zip/FOLDER`.

A subfolder (a sparsify hookpoint, a SAELens SAE id, a dictionary_learning trainer
directory) is fetched with huggingface_hub's `snapshot_download`, only that folder; a
`.pt` file (the seed study's SAEs) with `hf_hub_download`; a folder inside a zip archive
(saprmarks/pythia-70m-deduped-saes ships its dictionaries as one zip) by downloading the
archive and extracting that folder once, beside it in the cache. All use the user's
Hugging Face cache and token; offline or unknown repos give one error line.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from coact.errors import CoactError

PREFIX = "hf://"
FILE_SUFFIXES = (".pt",)


def is_hub_id(source: str | Path) -> bool:
    return str(source).startswith(PREFIX)


def split_hub_id(source: str) -> tuple[str, str]:
    """("OWNER/REPO", "SUBFOLDER/OR/FILE" or "") of an hf:// id."""
    parts = source[len(PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise CoactError(f"{source} is not of the form hf://OWNER/REPO[/SUBFOLDER]")
    return "/".join(parts[:2]), "/".join(parts[2:])


def fetch(source: str) -> Path:
    """The local path of an hf:// id, downloaded (or found in the cache) first."""
    repo, sub = split_hub_id(source)
    try:
        import huggingface_hub

        if ".zip/" in sub:
            archive, inner = sub.split(".zip/", 1)
            zipped = Path(huggingface_hub.hf_hub_download(repo, f"{archive}.zip"))
            return unzip_folder(zipped, inner.strip("/"), source)
        if sub.endswith(FILE_SUFFIXES):
            return Path(huggingface_hub.hf_hub_download(repo, sub))
        patterns = [f"{sub}/*"] if sub else None
        root = huggingface_hub.snapshot_download(repo, allow_patterns=patterns)
    except CoactError:
        raise
    except Exception as error:  # offline, unknown repo, gated: all mean "cannot get it"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CoactError(
            f"cannot download SAE repo {repo!r} from the Hugging Face hub ({first}); "
            "download it yourself and pass the local directory instead"
        ) from None
    path = Path(root) / sub
    if not path.exists():
        raise CoactError(f"{source}: the hub repo {repo!r} has no folder {sub!r}")
    return path


def unzip_folder(archive: Path, inner: str, source: str) -> Path:
    """`inner` of `archive`, extracted once into `<archive>.unzipped/` (into a temp folder
    first, then renamed, so a killed extraction is redone, never half used)."""
    if not inner or ".." in Path(inner).parts:
        raise CoactError(f"{source}: name a folder inside the archive, without '..'")
    root = archive.parent / f"{archive.name}.unzipped"
    target = root / inner
    if target.is_dir():
        return target
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.namelist() if m.startswith(f"{inner}/")]
            if not members:
                raise CoactError(f"{source}: the archive {archive.name} has no folder {inner!r}")
            root.mkdir(exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=root, prefix=".unzip."))
            try:
                zipped.extractall(staging, members)  # zipfile drops "..", absolute paths
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / inner, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (zipfile.BadZipFile, OSError) as error:
        raise CoactError(f"{source}: cannot unzip {archive.name} ({error})") from None
    return target
