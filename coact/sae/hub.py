"""Published dictionaries by hub id: `hf://OWNER/REPO[/SUBFOLDER]` or `hf://OWNER/REPO/FILE.pt`.

A subfolder (a sparsify hookpoint, a SAELens SAE id, a dictionary_learning trainer
directory) is fetched with huggingface_hub's `snapshot_download`, only that folder; a
`.pt` file (the seed study's SAEs) with `hf_hub_download`. Both use the user's Hugging Face
cache and token; offline or unknown repos give one error line.
"""

from __future__ import annotations

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

        if sub.endswith(FILE_SUFFIXES):
            return Path(huggingface_hub.hf_hub_download(repo, sub))
        patterns = [f"{sub}/*"] if sub else None
        root = huggingface_hub.snapshot_download(repo, allow_patterns=patterns)
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
