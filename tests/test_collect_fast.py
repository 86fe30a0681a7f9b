"""Collection's fast path gives the same bytes as the plain one: hooks read what nnsight
reads, the compiled TopK selection keeps torch.topk's codes bit for bit, and the store
written with the shard writer overlapping the next shard's encoding is the same."""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from coact.codes import collect as collect_module
from coact.codes import scratch as scratch_module
from coact.codes._topk import topk_csr
from coact.codes.collect import CollectConfig, collect_codes, encode_csr
from coact.codes.corpus import Contexts
from coact.codes.forward import read_sites, stream_sites
from coact.codes.scratch import scratch
from coact.codes.store import CodeStore
from coact.errors import CoactError
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site
from coact.models.tracing import capture, check_finite
from coact.pipeline.run import analyze
from coact.rundir.layout import RunLayout
from coact.sae.base import Sae
from tests.tiny_run import tiny_config


def _sae(d: int, width: int, k: int, seed: int) -> Sae:
    gen = torch.Generator().manual_seed(seed)
    sae = Sae(d, width, activation="topk", k=k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, width, generator=gen) / d**0.5)
        sae.b_enc.copy_(torch.randn(width, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=gen) * 0.1)
    return sae.eval().requires_grad_(False)


def _same(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.data.dtype == b.data.dtype == np.float32
    assert a.data.tobytes() == b.data.tobytes()


def test_topk_csr_against_brute_force() -> None:
    """A hand-made case: ties keep the lower index, ReLU drops non-positive picks."""
    pre = np.array([[3, 1, 2, 2, -1], [-5, -4, -3, 0.5, -2]], dtype=np.float32)
    bias = np.zeros(5, dtype=np.float32)
    indptr, indices, values = topk_csr(pre, bias, 3)
    np.testing.assert_array_equal(indptr, [0, 3, 4])
    np.testing.assert_array_equal(indices, [0, 2, 3, 3])
    np.testing.assert_array_equal(values, np.array([3, 2, 2, 0.5], dtype=np.float32))
    rng = np.random.default_rng(0)
    pre, bias = rng.normal(size=(50, 40)).astype(np.float32), rng.normal(size=40).astype(np.float32)
    indptr, indices, values = topk_csr(pre, bias, 7)
    total = pre + bias
    for row in range(50):  # brute force: sort the whole row
        top = np.sort(np.argsort(-total[row], kind="stable")[:7])
        top = top[total[row, top] > 0]
        np.testing.assert_array_equal(indices[indptr[row] : indptr[row + 1]], top)
        np.testing.assert_array_equal(values[indptr[row] : indptr[row + 1]], total[row, top])


def test_equal_values_at_the_kth_place_keep_the_lower_index() -> None:
    """Rows of few distinct values, so that many equal values straddle the k-th place: the
    picks are those of a stable sort (the lower index first), by hand and by brute force."""
    pre = np.array([[1, 1, 2], [2, 1, 1], [1, 2, 1]], dtype=np.float32)
    indptr, indices, _ = topk_csr(pre, np.zeros(3, dtype=np.float32), 2)
    np.testing.assert_array_equal(indices, [0, 2, 0, 1, 0, 1])
    rng = np.random.default_rng(1)
    pre = rng.integers(0, 4, size=(300, 30)).astype(np.float32)
    bias = np.zeros(30, dtype=np.float32)
    indptr, indices, _ = topk_csr(pre, bias, 9)
    for row in range(300):
        top = np.sort(np.argsort(-pre[row], kind="stable")[:9])
        top = top[pre[row, top] > 0]
        np.testing.assert_array_equal(indices[indptr[row] : indptr[row + 1]], top)


@pytest.mark.parametrize("k", [1, 8, 64])
def test_fused_encoding_is_bit_identical(k: int) -> None:
    torch.manual_seed(k)
    sae = _sae(32, 64 if k == 64 else 96, k, seed=k)
    x = torch.randn(300, 32) * 2
    _same(encode_csr(sae, x), encode_csr(sae, x, fused=False))
    reference = sp.csr_matrix(sae.encode(x).numpy())  # the SAE's own dense rule
    np.testing.assert_array_equal(encode_csr(sae, x).toarray(), reference.toarray())


def test_centred_rows_encode_as_the_raw_ones() -> None:
    """Rows whose decoder bias was taken off as they were copied (`centred`) give the bytes
    the raw rows give, screened or not; only a TopK SAE's rows may come centred."""
    sae = _sae(32, 96, 8, seed=3)
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(3)) * 2
    for screen in ("off", "bf16"):
        centred = encode_csr(sae, x - sae.b_dec, screen=screen, centred=True)
        _same(centred, encode_csr(sae, x, screen=screen))
    with pytest.raises(ValueError, match="centred"):
        encode_csr(Sae(32, 96, activation="relu"), x, centred=True)


def test_hooks_read_what_nnsight_reads(tiny: LoadedModel) -> None:
    layer = 1
    sites = [Site(kind, layer) for kind in ("resid_pre", "attn_out", "mlp_resid", "mlp_out")]
    tokens = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    ours, theirs = read_sites(tiny, tokens, sites), capture(tiny, tokens, sites)
    assert ours.keys() == theirs.keys()
    for site in sites:
        assert torch.equal(ours[site], theirs[site]), site


def test_streamed_sites_are_what_nnsight_reads(tiny: LoadedModel) -> None:
    """The sink gets each site once, in the pass's order, with what nnsight reads (two
    sites on one module point each get it)."""
    sites = [Site("mlp_out", 1), Site("resid_pre", 1), Site("mlp_resid", 1), Site("mlp_out", 0)]
    tokens = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    seen: list[tuple[Site, torch.Tensor]] = []
    stream_sites(tiny, tokens, sites, lambda site, x: seen.append((site, x.clone())))
    theirs = capture(tiny, tokens, sites)
    order = [tiny.adapter.order_key(site) for site, _ in seen]
    assert order == sorted(order) and sorted(str(site) for site, _ in seen) == sorted(
        map(str, sites)
    )
    for site, x in seen:
        assert torch.equal(x, theirs[site]), site


def _store_bytes(directory: Path) -> dict[str, bytes]:
    files = sorted(directory.rglob("*.safetensors"))
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def test_store_bytes_match_the_plain_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole fast collection against one built from nnsight, torch.topk and no writer
    thread: the same files, byte for byte."""
    lm = load_model("tiny-llama")
    tokens = torch.randint(1, 200, (24, 16), generator=torch.Generator().manual_seed(0))
    contexts = Contexts(tokens, torch.zeros_like(tokens, dtype=torch.int32), "random", "r", 1)
    saes = {Site("mlp_resid", 1): _sae(64, 256, 8, 1), Site("mlp_out", 1): _sae(64, 256, 8, 2)}
    config = dataclasses.replace(CollectConfig(), forward_batch=4, shard_contexts=8, screen="off")
    fast = collect_codes(lm, contexts, saes, tmp_path / "fast", config)
    monkeypatch.setattr(collect_module, "read_sites", capture)
    monkeypatch.setattr(
        collect_module,
        "encode_csr",
        lambda sae, x, centred=False, **_: encode_csr(sae, x, fused=False, centred=centred),
    )
    plain = collect_codes(lm, contexts, saes, tmp_path / "plain", config)
    assert len(fast.completed_shards) >= 3
    assert _store_bytes(tmp_path / "fast") == _store_bytes(tmp_path / "plain")
    assert fast.manifest["shards"] == plain.manifest["shards"]


def test_finite_check_catches_what_the_sum_hides() -> None:
    """The sum's shortcut: a NaN or an inf anywhere is caught; finite values whose sum
    overflows are finite."""
    site = Site("mlp_out", 1)
    x = torch.zeros(64, 33)
    check_finite({site: x})
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[40, 7] = bad
        with pytest.raises(CoactError, match=r"non-finite .* at mlp_out\[1\]"):
            check_finite({site: y})
    huge = torch.full((64, 33), 3e38)
    assert not bool(torch.isfinite(huge.sum()))
    check_finite({site: huge})
    with pytest.raises(CoactError, match="non-finite"):
        check_finite({site: torch.tensor([float("inf"), float("-inf"), 1.0])})


def test_scratch_buffers_are_reused_and_grown() -> None:
    a = scratch("test-buffer", (4, 8), torch.float32)
    b = scratch("test-buffer", (2, 3), torch.float32)
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 3)
    c = scratch("test-buffer", (100, 8), torch.float32)
    assert c.shape == (100, 8) and c.numel() == 800
    assert scratch("test-buffer", (5,), torch.bfloat16).dtype == torch.bfloat16


def test_shards_are_written_inline_when_torch_holds_every_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A writer thread only where a core is free for it (or the model is on a GPU);
    inline, a failed write raises at .result() as the thread's would."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(torch.get_num_threads())))
    inline = collect_module._writer(cpu)
    assert not isinstance(inline, ThreadPoolExecutor)
    with collect_module._writer(torch.device("cuda")) as threaded:
        assert isinstance(threaded, ThreadPoolExecutor)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(torch.get_num_threads() + 1)))
    with collect_module._writer(cpu) as threaded:
        assert isinstance(threaded, ThreadPoolExecutor)

    def fail() -> None:
        raise OSError("disk full")

    with inline as writer:
        done = writer.submit(fail)
        with pytest.raises(OSError, match="disk full"):
            done.result()


def test_rows_gathered_for_the_screen_fit_its_memory_budget() -> None:
    """SCREEN_ROWS for a layer's two sites; fewer for a whole model's sites (4·d bytes a
    row each) or a wide SAE's product (2·width bytes a row), by hand."""
    budget, cap = collect_module.SCREEN_BYTES, collect_module.SCREEN_ROWS
    assert collect_module._group_rows(576, [2304, 2304]) == cap
    assert collect_module._group_rows(576, [2304] * 121) == budget // (4 * 576 * 121) == 1925
    assert collect_module._group_rows(576, [2**20]) == budget // 2**21 == 256
    assert collect_module._group_rows(2**20, [4] * 200) == 1  # at least a row


def test_buffers_are_released_unless_kept_and_by_a_pipeline_run(tmp_path: Path) -> None:
    lm = load_model("tiny-llama")
    tokens = torch.randint(1, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    contexts = Contexts(tokens, torch.zeros_like(tokens, dtype=torch.int32), "random", "r", 1)
    config = dataclasses.replace(CollectConfig(), forward_batch=4, screen="bf16")
    saes = {Site("mlp_out", 1): _sae(64, 256, 8, 2)}
    collect_codes(lm, contexts, saes, tmp_path / "kept", config, keep_buffers=True)
    assert "pending:mlp_out.1" in scratch_module._LOCAL.buffers
    collect_codes(lm, contexts, saes, tmp_path / "released", config)
    assert not getattr(scratch_module._LOCAL, "buffers", {})
    run = tiny_config(tmp_path / "run", stages=(), tokens=1_000, sae_tokens=1_500)
    analyze(dataclasses.replace(run, collect=dataclasses.replace(run.collect, screen="bf16")))
    assert CodeStore.open(RunLayout.of(tmp_path / "run").codes).meta["screen"] == "bf16"
    assert not getattr(scratch_module._LOCAL, "buffers", {})
