"""The sparse, resumable, checksummed store of SAE feature codes.

Layout: `manifest.json`, `tokens/shard-NNNNN.safetensors` (context, position, token id,
document per stored token) and `<site>/shard-NNNNN.safetensors` (CSR indptr, indices,
values). Every file is written under a temporary name, fsynced and renamed, and the manifest
(with each file's sha256) is rewritten after every shard, so a killed writer leaves either a
whole shard or none, and a resumed one writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save

from coact.errors import CoactError
from coact.rundir.files import atomic_write, sha256_file
from coact.rundir.layout import CodesFiles

FORMAT = 1
Shards = Iterable[int] | None  # which shards to read; None: all
TOKEN_COLUMNS = ("context", "position", "token_id", "doc")
REWRITE = "collection to rewrite it"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        return (array.float() if array.is_floating_point() else array).numpy()
    return np.asarray(array)


def _csr_parts(codes: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """(indptr, indices, values, n_columns or None) of scipy sparse, torch CSR or a triple."""
    if isinstance(codes, torch.Tensor):
        t = codes.detach().cpu()
        t = t if t.layout == torch.sparse_csr else t.to_sparse_csr()
        codes = (t.crow_indices(), t.col_indices(), t.values(), int(t.shape[1]))
    elif not isinstance(codes, tuple):
        m = sp.csr_matrix(codes)
        codes = (m.indptr, m.indices, m.data, int(m.shape[1]))
    indptr, indices, values = (_numpy(a) for a in codes[:3])
    return indptr, indices, values, codes[3] if len(codes) > 3 else None


def _site_payload(
    codes: Any, n: int, width: int, dtype: torch.dtype, where: str
) -> dict[str, torch.Tensor]:
    """A site's shard tensors, checked first: CSR of n rows × width, canonical (duplicates
    summed, explicit zeros dropped, so equal codes give equal bytes), values cast to dtype."""
    indptr, indices, values, n_cols = _csr_parts(codes)
    if len(indptr) != n + 1:
        raise CoactError(f"{where}: codes have {len(indptr) - 1} rows for {n} tokens")
    ragged = len(indices) != len(values) or np.any(np.diff(indptr) < 0)
    if ragged or indptr[0] != 0 or indptr[-1] != len(values):
        raise CoactError(f"{where}: malformed CSR (indptr, indices, values)")
    out_of_range = len(indices) and (indices.min() < 0 or indices.max() >= width)
    if (n_cols is not None and n_cols != width) or out_of_range:
        raise CoactError(f"{where}: codes do not fit the SAE width {width}")
    m = sp.csr_matrix((values, indices, indptr), shape=(n, width))
    if not (m.has_canonical_format and np.all(m.data != 0)):  # the encoders' codes are
        m = m.copy()  # the caller's arrays stay as they were
        m.sum_duplicates()
        m.eliminate_zeros()
    cast = torch.from_numpy(m.data.astype(np.float32, copy=False)).to(dtype)
    if not np.isfinite(cast.float().numpy()).all():  # numpy's check: torch's is 6× slower
        raise CoactError(f"{where}: non-finite codes (NaN, inf, or too big for {dtype})")
    index_dtype = np.int16 if width <= 32767 else np.int32
    return {
        "indptr": torch.from_numpy(m.indptr.astype(np.int64)),
        "indices": torch.from_numpy(m.indices.astype(index_dtype)),
        "values": cast,
    }


class CodeStore:
    """Read and write one store directory; see the module docstring for its layout."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.fingerprint: str = manifest["fingerprint"]
        self.meta: dict[str, Any] = manifest.get("meta", {})
        self._verified: set[str] = set()  # files hashed by this instance: read without rehash

    @classmethod
    def of(cls, store: CodeStore | str | Path) -> CodeStore:
        """`store` itself, or the store in that directory."""
        return store if isinstance(store, CodeStore) else cls.open(store)

    def require(self, slugs: Iterable[str]) -> None:
        """One clear error when a site a stage reads is not in the store."""
        if missing := [slug for slug in slugs if slug not in self.sites]:
            raise CoactError(
                f"site{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"{'are' if len(missing) > 1 else 'is'} not in the code store {self.directory}; "
                f"it has {sorted(self.sites)}"
            )

    @classmethod
    def open(cls, directory: str | Path) -> CodeStore:
        directory = Path(directory)
        path = CodesFiles(directory).manifest
        if not path.is_file():
            raise CoactError(f"no feature codes in {directory} (manifest.json missing)")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CoactError(f"corrupt manifest {path}: {error}") from None
        keys = {"format", "fingerprint", "sites", "values_dtype", "shards", "n_tokens"}
        if not isinstance(manifest, dict) or not keys <= manifest.keys():
            raise CoactError(f"corrupt manifest {path}: expected the keys {sorted(keys)}")
        if manifest["format"] != FORMAT:
            raise CoactError(f"{path} is format {manifest['format']}; this coact reads {FORMAT}")
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
        """Create a store, or resume one made from the same model, SAEs, corpus and dtype.

        On resume, temp files of a killed run are removed, shards whose files were deleted
        are dropped (so they are rewritten) and the rest are checksummed."""
        if values_dtype not in _DTYPES:
            raise CoactError(f"values dtype {values_dtype!r} unsupported; use one of {[*_DTYPES]}")
        directory = Path(directory)
        site_entries = {k: {"width": int(sites[k])} for k in sorted(sites)}
        key = {"fingerprint": fingerprint, "sites": site_entries, "values_dtype": values_dtype}
        if not CodesFiles(directory).manifest.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            store = cls(directory, {"format": FORMAT, "meta": dict(meta or {}), **key})
            store._set_shards([])
            return store
        store = cls.open(directory)
        if {k: store.manifest[k] for k in key} != key:
            raise CoactError(
                f"{directory} holds codes from a different model/SAE/corpus (or values dtype); "
                "use another run directory or delete this one"
            )
        for tmp in directory.rglob("*.tmp"):
            tmp.unlink()
        shards = store.manifest["shards"]
        store._set_shards([s for s in shards if all((directory / r).is_file() for r in s["files"])])
        store.verify()
        return store

    @property
    def sites(self) -> dict[str, int]:
        return {k: int(v["width"]) for k, v in self.manifest["sites"].items()}

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def completed_shards(self) -> set[int]:
        return {int(s["index"]) for s in self.manifest["shards"]}

    def write_shard(self, index: int, tokens: Mapping[str, Any], codes: Mapping[str, Any]) -> None:
        """Validate everything first, so a bad shard leaves no file; then write and record it.

        `codes[site]` is a scipy sparse matrix, a torch sparse tensor or (indptr, indices,
        values). Duplicate entries are summed and explicit zeros dropped (canonical bytes)."""
        index = int(index)  # a numpy integer would not serialise into the manifest
        if index < 0 or index in self.completed_shards:
            raise ValueError(f"shard {index} is already complete (or negative)")
        table = {c: np.asarray(tokens.get(c, ()), dtype=np.int32) for c in TOKEN_COLUMNS}
        n = len(table["token_id"])
        if missing := [c for c in TOKEN_COLUMNS if c not in tokens or len(table[c]) != n]:
            raise CoactError(f"shard {index}: token columns {missing} missing or not {n} long")
        if missing := sorted(set(self.sites) - set(codes)):
            raise CoactError(f"shard {index} lacks codes for the sites {missing}")
        dtype = _DTYPES[self.manifest["values_dtype"]]
        payloads = {"tokens": {c: torch.from_numpy(v) for c, v in table.items()}}
        for slug, width in self.sites.items():
            where = f"site {slug} in shard {index}"
            payloads[slug] = _site_payload(codes[slug], n, width, dtype, where)
        files: dict[str, str] = {}
        for folder, payload in payloads.items():
            relative = CodesFiles.shard(folder, index)
            path = self.directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            data = save(payload)  # hashed in memory, not read back from the file
            atomic_write(path, partial(Path.write_bytes, data=data))
            files[relative] = hashlib.sha256(data).hexdigest()
            self._verified.add(relative)
        shard = {"index": index, "n_tokens": n, "n_contexts": len(np.unique(table["context"]))}
        self._set_shards([*self.manifest["shards"], {**shard, "files": files}])

    def _set_shards(self, shards: list[dict[str, Any]]) -> None:
        self.manifest["shards"] = sorted(shards, key=lambda s: int(s["index"]))
        self.manifest["n_tokens"] = sum(int(s["n_tokens"]) for s in shards)
        text = json.dumps(self.manifest, sort_keys=True, indent=1)
        atomic_write(CodesFiles(self.directory).manifest, lambda tmp: tmp.write_text(text))

    def _checked(self, relative: str, expected: str) -> Path:
        path = self.directory / relative
        if relative not in self._verified:
            if not path.is_file() or sha256_file(path) != expected:
                fix = "is corrupt; delete it and" if path.is_file() else "is missing;"
                raise CoactError(f"checksum mismatch in {path}: the file {fix} re-run {REWRITE}")
            self._verified.add(relative)
        return path

    def verify(self) -> None:
        """Re-hash every file (ignoring this instance's cache); the first bad one is named."""
        self._verified.clear()
        for relative, digest in (f for s in self.manifest["shards"] for f in s["files"].items()):
            self._checked(relative, digest)

    def _load(self, shard: dict[str, Any], folder: str) -> dict[str, torch.Tensor]:
        relative = CodesFiles.shard(folder, int(shard["index"]))
        return load_file(str(self._checked(relative, shard["files"].get(relative, "?"))))

    def iter_site(self, slug: str, shards: Shards = None) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(shard index, float32 CSR codes) shard by shard, so a big site needn't fit at once."""
        if slug not in self.sites:
            raise CoactError(f"site {slug!r} is not in this store; it has {sorted(self.sites)}")
        wanted = self.completed_shards if shards is None else set(shards)
        if missing := sorted(wanted - self.completed_shards):
            raise CoactError(f"shards {missing} are not in {self.directory}")
        for shard in (s for s in self.manifest["shards"] if int(s["index"]) in wanted):
            t = self._load(shard, slug)
            parts = (t["values"].float().numpy(), t["indices"].int().numpy(), t["indptr"].numpy())
            shape = (int(shard["n_tokens"]), self.sites[slug])
            yield int(shard["index"]), sp.csr_matrix(parts, shape=shape)

    def read_site(self, slug: str, shards: Shards = None) -> sp.csr_matrix:
        empty = sp.csr_matrix((0, self.sites[slug]), dtype=np.float32)
        return sp.csr_matrix(sp.vstack([empty, *(m for _, m in self.iter_site(slug, shards))]))

    def read_tokens(self) -> pl.DataFrame:
        schema = dict.fromkeys(TOKEN_COLUMNS, pl.Int32)
        tables = (self._load(s, "tokens") for s in self.manifest["shards"])
        frames = (pl.DataFrame({c: t[c].numpy() for c in TOKEN_COLUMNS}) for t in tables)
        return pl.concat([pl.DataFrame(schema=schema), *frames])

    def bytes_per_token(self, slug: str) -> dict[str, float]:
        """Stored file bytes vs the ideal nonzeros × (index + value) bytes vs dense float32."""
        n = max(self.n_tokens, 1)
        files = [self.directory / r for s in self.manifest["shards"] for r in s["files"]]
        stored = sum(p.stat().st_size for p in files if p.parent.name == slug)
        width = self.sites[slug]
        per_nonzero = (2 if width <= 32767 else 4) + _DTYPES[self.manifest["values_dtype"]].itemsize
        nnz = sum(m.nnz for _, m in self.iter_site(slug))
        return {"stored": stored / n, "ideal": nnz * per_nonzero / n, "dense_float32": 4.0 * width}
