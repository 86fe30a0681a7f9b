"""The code store: exact round trips, byte-identical resumption, named corruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import coact.codes.store
from coact.codes.store import CodeStore, sha256_file
from coact.errors import CoactError

SITES = {"mlp_out.1": 12, "mlp_resid.1": 10}


def _tokens(n: int, context: int = 0) -> dict[str, np.ndarray]:
    return {
        "context": np.full(n, context, dtype=np.int32),
        "position": np.arange(1, n + 1, dtype=np.int32),
        "token_id": np.arange(100, 100 + n, dtype=np.int32),
        "doc": np.zeros(n, dtype=np.int32),
    }


def _codes(n: int, seed: int, density: float = 0.2) -> dict[str, sp.csr_matrix]:
    rng = np.random.default_rng(seed)
    return {
        slug: sp.random(n, w, density=density, format="csr", dtype=np.float32, random_state=rng)
        for slug, w in SITES.items()
    }


def _write(directory: Path, shards: range, fingerprint: str = "fp") -> CodeStore:
    store = CodeStore.open_for_writing(directory, fingerprint=fingerprint, sites=SITES)
    for i in shards:
        if i not in store.completed_shards:
            store.write_shard(i, _tokens(7, i), _codes(7, seed=i))
    return store


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_hand_computed_bytes_per_token(tmp_path: Path) -> None:
    store = CodeStore.open_for_writing(tmp_path, fingerprint="x", sites={"s": 10})
    matrix = sp.csr_matrix(
        np.array(
            [[0, 1.5, 0, 0, 0, 0, 0, 0, 0, 2.0], [0] * 10, [3.0] + [0] * 8 + [4.0]],
            dtype=np.float32,
        )
    )
    store.write_shard(0, _tokens(3), {"s": matrix})
    sizes = store.bytes_per_token("s")
    assert sizes["ideal"] == 4 * (2 + 4) / 3 == 8.0  # int16 index + float32 value per nonzero
    assert sizes["dense_float32"] == 40.0
    site_file = tmp_path / "s" / "shard-00000.safetensors"
    assert sizes["stored"] == site_file.stat().st_size / 3
    np.testing.assert_array_equal(store.read_site("s").toarray(), matrix.toarray())
    tokens = store.read_tokens()
    assert tokens.columns == ["context", "position", "token_id", "doc"]
    assert tokens["token_id"].to_list() == [100, 101, 102]
    assert tokens["position"].to_list() == [1, 2, 3]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["n_tokens"] == 3 and manifest["shards"][0]["n_contexts"] == 1
    assert manifest["shards"][0]["files"]["s/shard-00000.safetensors"] == sha256_file(site_file)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(0, 40), density=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_round_trip_is_exact(
    tmp_path_factory: pytest.TempPathFactory, n: int, density: float, seed: int
) -> None:
    directory = tmp_path_factory.mktemp("store")
    store = CodeStore.open_for_writing(directory, fingerprint="fp", sites=SITES, meta={"a": 1})
    codes = _codes(n, seed, density)
    store.write_shard(0, _tokens(n), codes)
    reopened = CodeStore.open(directory)
    for slug, matrix in codes.items():
        back = reopened.read_site(slug)
        assert back.dtype == np.float32 and back.shape == (n, SITES[slug])
        np.testing.assert_array_equal(back.toarray(), matrix.toarray())
    assert reopened.n_tokens == n and reopened.meta == {"a": 1} and reopened.fingerprint == "fp"
    assert reopened.sites == SITES


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_torch_and_triple_inputs_and_half_dtypes(tmp_path: Path) -> None:
    dense = np.zeros((4, 40000), dtype=np.float32)  # wide: int32 indices
    dense[0, 39999], dense[2, 5], dense[3, 7] = 1.25, -3.5, 1e-3
    csr = sp.csr_matrix(dense)
    sites = {"a": 40000, "b": 40000, "c": 40000}
    for values_dtype, torch_dtype in [("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        store = CodeStore.open_for_writing(
            tmp_path / values_dtype, fingerprint="fp", sites=sites, values_dtype=values_dtype
        )
        codes = {
            "a": csr,
            "b": torch.from_numpy(dense).to_sparse_csr(),
            "c": (csr.indptr, csr.indices, torch.from_numpy(csr.data)),
        }
        store.write_shard(0, _tokens(4), codes)
        rounded = torch.from_numpy(dense).to(torch_dtype).float().numpy()
        for slug in sites:
            np.testing.assert_array_equal(store.read_site(slug).toarray(), rounded)
        assert store.bytes_per_token("a")["ideal"] == 3 * (4 + 2) / 4


def test_same_shards_give_identical_bytes(tmp_path: Path) -> None:
    _write(tmp_path / "one", range(3))
    _write(tmp_path / "two", range(3))
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_duplicates_unsorted_and_zeros_are_canonicalised(tmp_path: Path) -> None:
    """Codes with a duplicate (0.25 + 0.75 at feature 4), an unsorted row and an explicit
    zero give the bytes of their canonical form, and the caller's arrays are left alone."""
    canonical = (
        np.array([0, 2, 2, 4]),
        np.array([1, 4, 0, 9]),
        np.array([2.0, 1.0, 3.0, 0.5], dtype=np.float32),
    )
    messy = (
        np.array([0, 3, 4, 6]),
        np.array([4, 1, 4, 3, 9, 0]),
        np.array([0.25, 2.0, 0.75, 0.0, 0.5, 3.0], dtype=np.float32),
    )
    kept = tuple(a.copy() for a in messy)
    for name, codes in (("canonical", canonical), ("messy", messy)):
        store = CodeStore.open_for_writing(tmp_path / name, fingerprint="fp", sites=SITES)
        store.write_shard(0, _tokens(3), dict.fromkeys(SITES, codes))
    assert _files(tmp_path / "canonical") == _files(tmp_path / "messy")
    assert all(np.array_equal(a, b) for a, b in zip(messy, kept, strict=True))


def test_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    full = _write(tmp_path / "full", range(3))
    _write(tmp_path / "part", range(2))
    resumed = CodeStore.open_for_writing(tmp_path / "part", fingerprint="fp", sites=SITES)
    assert resumed.completed_shards == {0, 1}
    resumed.write_shard(2, _tokens(7, 2), _codes(7, seed=2))
    for slug in SITES:
        assert (resumed.read_site(slug) != full.read_site(slug)).nnz == 0
    assert resumed.read_tokens().equals(full.read_tokens())
    assert _files(tmp_path / "part") == _files(tmp_path / "full")


def test_resume_after_kill_is_byte_identical(tmp_path: Path) -> None:
    _write(tmp_path / "full", range(4))
    _write(tmp_path / "part", range(2))
    # A kill mid-shard: a temp file and a shard file that never reached the manifest.
    (tmp_path / "part" / "mlp_out.1" / "shard-00002.safetensors.tmp").write_bytes(b"half")
    (tmp_path / "part" / "tokens" / "shard-00002.safetensors").write_bytes(b"stale")
    resumed = _write(tmp_path / "part", range(4))
    assert resumed.completed_shards == {0, 1, 2, 3}
    assert not list((tmp_path / "part").rglob("*.tmp"))
    assert _files(tmp_path / "part") == _files(tmp_path / "full")


def test_shards_out_of_order_are_read_in_index_order(tmp_path: Path) -> None:
    store = _write(tmp_path / "a", range(2, 3))
    store.write_shard(0, _tokens(7, 0), _codes(7, seed=0))
    assert [i for i, _ in store.iter_site("mlp_out.1")] == [0, 2]
    assert store.read_tokens()["context"].unique(maintain_order=True).to_list() == [0, 2]
    np.testing.assert_array_equal(
        store.read_site("mlp_out.1", shards=[2]).toarray(), _codes(7, seed=2)["mlp_out.1"].toarray()
    )
    with pytest.raises(CoactError, match=r"shards \[1\] are not in"):
        store.read_site("mlp_out.1", shards=[1])
    with pytest.raises(ValueError, match="already complete"):
        store.write_shard(2, _tokens(7, 2), _codes(7, seed=2))


def test_other_model_or_dtype_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, range(1))
    for kwargs in [
        {"fingerprint": "other", "sites": SITES},
        {"fingerprint": "fp", "sites": {**SITES, "mlp_out.2": 12}},
        {"fingerprint": "fp", "sites": SITES, "values_dtype": "float16"},
    ]:
        with pytest.raises(CoactError, match=r"different model/SAE/corpus.*another run directory"):
            CodeStore.open_for_writing(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_corrupt_shard_is_named(tmp_path: Path) -> None:
    _write(tmp_path, range(2))
    victim = tmp_path / "mlp_out.1" / "shard-00001.safetensors"
    _flip_last_byte(victim)
    store = CodeStore.open(tmp_path)
    pattern = r"checksum mismatch in .*mlp_out\.1/shard-00001\.safetensors: the file is corrupt"
    with pytest.raises(CoactError, match=pattern):
        store.read_site("mlp_out.1")
    with pytest.raises(CoactError, match=pattern):
        CodeStore.open(tmp_path).verify()
    with pytest.raises(CoactError, match=pattern):
        CodeStore.open_for_writing(tmp_path, fingerprint="fp", sites=SITES)
    store.read_site("mlp_resid.1")  # the other site is intact
    # Following the advice (delete it, re-run) rewrites the shard.
    victim.unlink()
    _write(tmp_path, range(2))
    _write(tmp_path / "clean", range(2))
    assert _files(tmp_path / "clean") == {
        k: v for k, v in _files(tmp_path).items() if not k.startswith("clean")
    }


def test_reads_hash_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, range(2))
    calls: list[str] = []
    real = coact.codes.store.sha256_file

    def counting(path: Path) -> str:
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(coact.codes.store, "sha256_file", counting)
    store = CodeStore.open(tmp_path)
    store.read_site("mlp_out.1")
    store.read_site("mlp_out.1")
    assert len(calls) == 2
    store.verify()  # an explicit verify re-hashes everything: 2 shards × 3 files
    assert len(calls) == 2 + 6


def test_bad_shards_leave_nothing(tmp_path: Path) -> None:
    store = CodeStore.open_for_writing(tmp_path, fingerprint="fp", sites=SITES)
    nan = _codes(5, 0)
    nan["mlp_out.1"].data[0] = np.nan
    with pytest.raises(CoactError, match=r"site mlp_out\.1 in shard 0: non-finite"):
        store.write_shard(0, _tokens(5), nan)
    wide = _codes(5, 0)
    wide["mlp_out.1"] = sp.csr_matrix(np.ones((5, 13), dtype=np.float32))
    with pytest.raises(CoactError, match="do not fit the SAE width 12"):
        store.write_shard(0, _tokens(5), wide)
    triple = _codes(5, 0)
    triple["mlp_resid.1"] = (np.array([0, 1, 1, 1, 1, 1]), np.array([10]), np.ones(1))
    with pytest.raises(CoactError, match=r"mlp_resid\.1 in shard 0: .*SAE width 10"):
        store.write_shard(0, _tokens(5), triple)
    with pytest.raises(CoactError, match="4 rows for 5 tokens"):
        store.write_shard(0, _tokens(5), _codes(4, 0))
    with pytest.raises(CoactError, match=r"lacks codes for the sites \['mlp_resid\.1'\]"):
        store.write_shard(0, _tokens(5), {"mlp_out.1": _codes(5, 0)["mlp_out.1"]})
    with pytest.raises(CoactError, match=r"token columns \['doc'\]"):
        store.write_shard(0, {**_tokens(5), "doc": np.zeros(4)}, _codes(5, 0))
    half = CodeStore.open_for_writing(
        tmp_path / "half", fingerprint="fp", sites=SITES, values_dtype="float16"
    )
    big = _codes(5, 0)
    big["mlp_out.1"].data[:] = 1e6  # finite in float32, inf in float16
    with pytest.raises(CoactError, match=r"too big for torch\.float16"):
        half.write_shard(0, _tokens(5), big)
    assert not list(tmp_path.rglob("shard-*"))
    assert CodeStore.open(tmp_path).completed_shards == set()


def test_missing_and_corrupt_manifest(tmp_path: Path) -> None:
    with pytest.raises(CoactError, match=r"no feature codes in .* \(manifest\.json missing\)"):
        CodeStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CoactError, match="corrupt manifest"):
        CodeStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(CoactError, match="corrupt manifest"):
        CodeStore.open(tmp_path)
    with pytest.raises(CoactError, match="unsupported"):
        CodeStore.open_for_writing(tmp_path / "x", fingerprint="f", sites={}, values_dtype="int8")
