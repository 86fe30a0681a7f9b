"""The sparse, resumable, checksummed store of SAE feature codes.

Layout: `manifest.json`, `tokens/shard-NNNNN.safetensors` (context, position, token id,
document per stored token) and `<site>/shard-NNNNN.safetensors` (CSR indptr, indices,
values). Files are written under a temporary name and renamed, and the manifest (with each
file's sha256) is rewritten after every shard, so a killed writer leaves either a whole
shard or none, and a resumed one writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from coact.errors import CoactError

FORMAT = 1
TOKEN_COLUMNS = ("context", "position", "token_id", "doc")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class CodeStore:
    """Read and write one store directory; see the module docstring for its layout."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        self._verified: set[str] = set()

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path) -> CodeStore:
        directory = Path(directory)
        path = directory / "manifest.json"
        if not path.is_file():
            raise CoactError(f"no feature codes in {directory} (manifest.json missing)")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CoactError(f"corrupt manifest {path}: {error}") from None
        if not isinstance(manifest, dict) or not {"shards", "sites", "n_tokens"} <= manifest.keys():
            raise CoactError(f"corrupt manifest {path}: shards, sites or n_tokens missing")
        return cls(directory, manifest)

    @classmethod
    def open_for_writing(
        cls,
        directory: str | Path,
        *,
        fingerprint: str,
        sites: Mapping[str, int],
        values_dtype: str = "float32",
        meta: Mapping[str, Any] | None = None,
    ) -> CodeStore:
        """Create a store, or resume one made by the same model, SAEs, corpus and dtype."""
        if values_dtype not in _DTYPES:
            raise CoactError(
                f"values dtype {values_dtype!r} unsupported; use one of {list(_DTYPES)}"
            )
        directory = Path(directory)
        if (directory / "manifest.json").is_file():
            store = cls.open(directory)
            m = store.manifest
            same = (
                m.get("fingerprint") == fingerprint
                and m.get("sites") == {k: {"width": int(v)} for k, v in sites.items()}
                and m.get("values_dtype") == values_dtype
            )
            if not same:
                raise CoactError(
                    f"{directory} holds codes from a different model, SAE, corpus or dtype; "
                    "use another run directory or delete this one"
                )
            for tmp in directory.rglob("*.tmp"):
                tmp.unlink()
            store.verify()
            return store
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "meta": dict(meta or {}),
            "sites": {k: {"width": int(v)} for k, v in sites.items()},
            "values_dtype": values_dtype,
            "shards": [],
            "n_tokens": 0,
        }
        store = cls(directory, manifest)
        store._write_manifest()
        return store

    # -- properties --------------------------------------------------------------------
    @property
    def sites(self) -> dict[str, int]:
        return {k: int(v["width"]) for k, v in self.manifest["sites"].items()}

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.manifest.get("meta", {}))

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def completed_shards(self) -> set[int]:
        return {int(s["index"]) for s in self.manifest["shards"]}

    # -- writing -----------------------------------------------------------------------
    def write_shard(
        self, index: int, tokens: Mapping[str, np.ndarray], codes: Mapping[str, sp.csr_matrix]
    ) -> None:
        """Validate, write every file of shard `index`, then record it in the manifest."""
        if index in self.completed_shards:
            raise ValueError(f"shard {index} is already complete")
        n = len(tokens["token_id"])
        if set(codes) != set(self.sites):
            raise CoactError(
                f"shard {index} has sites {sorted(codes)}, expected {sorted(self.sites)}"
            )
        dtype = _DTYPES[self.manifest["values_dtype"]]
        tensors: dict[str, dict[str, torch.Tensor]] = {
            "tokens": {
                c: torch.from_numpy(np.asarray(tokens[c], dtype=np.int32)) for c in TOKEN_COLUMNS
            }
        }
        for slug, width in self.sites.items():
            matrix = sp.csr_matrix(codes[slug])
            matrix.sort_indices()
            if matrix.shape[0] != n:
                raise CoactError(f"{slug} shard {index}: {matrix.shape[0]} rows for {n} tokens")
            if matrix.shape[1] != width or (matrix.nnz and matrix.indices.max() >= width):
                raise CoactError(f"{slug} shard {index}: codes wider than the SAE width {width}")
            if not np.isfinite(matrix.data).all():
                raise CoactError(f"non-finite (NaN or inf) codes at {slug} in shard {index}")
            index_dtype = np.int16 if width <= 32767 else np.int32
            tensors[slug] = {
                "indptr": torch.from_numpy(matrix.indptr.astype(np.int64)),
                "indices": torch.from_numpy(matrix.indices.astype(index_dtype)),
                "values": torch.from_numpy(matrix.data.astype(np.float32)).to(dtype),
            }
        files: dict[str, str] = {}
        for folder, payload in tensors.items():
            path = self.directory / folder / f"shard-{index:05d}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, lambda tmp, p=payload: save_file(p, str(tmp)))
            files[f"{folder}/{path.name}"] = sha256_file(path)
            self._verified.add(f"{folder}/{path.name}")
        entry = {
            "index": index,
            "n_tokens": n,
            "n_contexts": len(np.unique(tokens["context"])),
            "files": files,
        }
        self.manifest["shards"] = sorted(
            [*self.manifest["shards"], entry], key=lambda s: s["index"]
        )
        self.manifest["n_tokens"] = sum(int(s["n_tokens"]) for s in self.manifest["shards"])
        self._write_manifest()

    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest, sort_keys=True, indent=1)
        _atomic_write(self.directory / "manifest.json", lambda tmp: tmp.write_text(text))

    # -- reading -----------------------------------------------------------------------
    def _checked(self, relative: str, expected: str) -> Path:
        path = self.directory / relative
        if relative not in self._verified:
            if not path.is_file():
                raise CoactError(f"missing shard file {path}; re-run collection to rewrite it")
            if sha256_file(path) != expected:
                raise CoactError(
                    f"checksum mismatch in {path}: the file is corrupt; delete it and re-run "
                    "collection to rewrite it"
                )
            self._verified.add(relative)
        return path

    def verify(self) -> None:
        """Check every file's sha256; the first bad one is an error naming it."""
        self._verified.clear()
        for shard in self.manifest["shards"]:
            for relative, digest in shard["files"].items():
                self._checked(relative, digest)

    def _load(self, shard: dict[str, Any], folder: str) -> dict[str, torch.Tensor]:
        relative = f"{folder}/shard-{int(shard['index']):05d}.safetensors"
        if relative not in shard["files"]:
            raise CoactError(f"shard {shard['index']} has no file for {folder}")
        return load_file(str(self._checked(relative, shard["files"][relative])))

    def iter_site(
        self, slug: str, shards: Iterable[int] | None = None
    ) -> Iterator[tuple[int, sp.csr_matrix]]:
        if slug not in self.sites:
            raise CoactError(f"site {slug!r} is not in this store; it has {sorted(self.sites)}")
        wanted = None if shards is None else set(shards)
        for shard in self.manifest["shards"]:
            if wanted is not None and int(shard["index"]) not in wanted:
                continue
            t = self._load(shard, slug)
            matrix = sp.csr_matrix(
                (
                    t["values"].float().numpy(),
                    t["indices"].numpy().astype(np.int32),
                    t["indptr"].numpy(),
                ),
                shape=(int(shard["n_tokens"]), self.sites[slug]),
            )
            yield int(shard["index"]), matrix

    def read_site(self, slug: str, shards: Iterable[int] | None = None) -> sp.csr_matrix:
        parts = [m for _, m in self.iter_site(slug, shards)]
        if not parts:
            return sp.csr_matrix((0, self.sites[slug]), dtype=np.float32)
        return sp.vstack(parts, format="csr")

    def read_tokens(self) -> pl.DataFrame:
        frames = [
            pl.DataFrame({c: t[c].numpy() for c in TOKEN_COLUMNS})
            for t in (self._load(s, "tokens") for s in self.manifest["shards"])
        ]
        if not frames:
            return pl.DataFrame(
                {c: [] for c in TOKEN_COLUMNS}, schema=dict.fromkeys(TOKEN_COLUMNS, pl.Int32)
            )
        return pl.concat(frames)

    def bytes_per_token(self, slug: str) -> dict[str, float]:
        """Stored file bytes vs the ideal nonzeros × (index + value) bytes vs dense float32."""
        n = max(self.n_tokens, 1)
        stored = sum(
            (self.directory / rel).stat().st_size
            for s in self.manifest["shards"]
            for rel in s["files"]
            if rel.startswith(f"{slug}/")
        )
        width = self.sites[slug]
        index_bytes = 2 if width <= 32767 else 4
        value_bytes = _DTYPES[self.manifest["values_dtype"]].itemsize
        nnz = sum(m.nnz for _, m in self.iter_site(slug))
        return {
            "stored": stored / n,
            "ideal": nnz * (index_bytes + value_bytes) / n,
            "dense_float32": 4.0 * width,
        }
