"""The bfloat16 screen of the TopK encoder picks the features the float32 path picks: on
random rows, rows of every magnitude, near-ties the screen cannot resolve, and rows where
its candidates fall short (widened) or its inputs are not finite (scored in full)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from coact.codes import collect as collect_module
from coact.codes import screen as screen_module
from coact.codes._candidates import _floor, _normal_cut
from coact.codes.collect import (
    CollectConfig,
    collect_codes,
    collection_fingerprint,
    encode_csr,
    model_fingerprint,
)
from coact.codes.corpus import Contexts
from coact.codes.screen import (
    UNIT,
    ScreenCounts,
    _bounds,
    _dots4,
    _row_terms,
    _score_block,
    _top_ranked,
    resolve_screen,
    screen_weights,
    screened_topk_csr,
)
from coact.codes.store import CodeStore
from coact.errors import CoactError
from coact.models.adapters import resolve
from coact.models.load import load_model
from coact.models.sites import Site
from coact.sae.base import Sae


def _sae(d: int, width: int, k: int, seed: int, w_enc: torch.Tensor | None = None) -> Sae:
    gen = torch.Generator().manual_seed(seed)
    sae = Sae(d, width, activation="topk", k=k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, width, generator=gen) / d**0.5 if w_enc is None else w_enc)
        sae.b_enc.copy_(torch.randn(width, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=gen) * 0.1)
    return sae.eval().requires_grad_(False)


def _screened(sae: Sae, x: torch.Tensor, margin: int = 16) -> tuple[sp.csr_matrix, ScreenCounts]:
    weights = screen_weights(sae, sae.W_enc)
    assert weights is not None
    x = x - sae.b_dec
    parts, counts = screened_topk_csr(x, weights, sae.b_enc.numpy(), int(sae.k or 0), margin)
    return sp.csr_matrix(parts[::-1], shape=(len(x), sae.width)), counts


def _same_features(ours: sp.csr_matrix, exact: sp.csr_matrix) -> None:
    """The same active features per row; values equal to float32 rounding (1e-5 of the
    row's largest value: two float32 dot products summed in different orders)."""
    np.testing.assert_array_equal(ours.indptr, exact.indptr)
    np.testing.assert_array_equal(ours.indices, exact.indices)
    scale = np.repeat(
        np.maximum.reduceat(np.abs(exact.data), exact.indptr[:-1]) if exact.nnz else [],
        np.diff(exact.indptr),
    )
    with np.errstate(invalid="ignore"):  # inf − inf where a row overflowed: equal, then
        close = (ours.data == exact.data) | (np.abs(ours.data - exact.data) <= 1e-5 * scale)
    assert np.all(close)


@pytest.mark.parametrize("k", [1, 8, 32])
def test_random_rows_of_every_magnitude(k: int) -> None:
    sae = _sae(96, 384, k, seed=k)
    gen = torch.Generator().manual_seed(100 + k)
    x = torch.randn(600, 96, generator=gen)
    scale = 10.0 ** torch.randint(-30, 30, (600, 1), generator=gen).float()
    x = x * scale  # rows from 1e-30 to 1e29: the bound scales with each row
    ours, counts = _screened(sae, x + sae.b_dec)
    _same_features(ours, encode_csr(sae, x + sae.b_dec))
    assert counts.rows == 600 and counts.full_rows == 0
    assert counts.scored < 0.5 * 600 * 384  # the screen spared most dot products
    _same_features(encode_csr(sae, x, screen="bf16"), encode_csr(sae, x, screen="off"))


def test_near_ties_the_screen_cannot_resolve() -> None:
    """Columns in pairs W_b = W_a (1 + 2⁻¹⁰): their values differ by 0.1 %, below what the
    bfloat16 product resolves (its rounding is ~0.4 %) yet far above float32's; the pair's
    screened order is often the wrong one, and the exact step must still decide it."""
    d, half, k = 64, 96, 15  # odd: the k-th and (k+1)-th values are one pair
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(d, half, generator=gen) / d**0.5
    w_enc = torch.cat([base, base * (1 + 2.0**-10)], dim=1)
    sae = _sae(d, 2 * half, k, seed=3, w_enc=w_enc)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.randn(800, d, generator=gen)
    exact = (x @ w_enc).numpy()
    screened = (x.bfloat16() @ w_enc.bfloat16()).float().numpy()
    a, b = exact[:, :half], exact[:, half:]
    wrong = np.sign(screened[:, :half] - screened[:, half:]) != np.sign(a - b)
    assert wrong.mean() > 0.05  # the screen alone would misorder many pairs
    ours, _ = _screened(sae, x)
    _same_features(ours, encode_csr(sae, x))
    kth = np.sort(exact, axis=1)[:, -k]
    gap = kth - np.sort(exact, axis=1)[:, -k - 1]
    assert (gap < UNIT * np.abs(kth)).mean() > 0.9  # the k-th place is a near-tie


def test_widening_is_exercised_and_counted() -> None:
    """With no margin the candidates often fall short of proving the top k: those rows are
    widened, counted, and still give the exact features."""
    sae = _sae(64, 256, 16, seed=5)
    x = torch.randn(400, 64, generator=torch.Generator().manual_seed(5))
    before = dataclasses.replace(screen_module.COUNTS)
    ours, counts = _screened(sae, x, margin=0)
    _same_features(ours, encode_csr(sae, x))
    assert 0 < counts.widened_rows < counts.rows
    assert counts.fallback_rate() == counts.widened_rows / counts.rows
    assert screen_module.COUNTS.widened_rows - before.widened_rows == counts.widened_rows
    _, roomy = _screened(sae, x, margin=48)
    assert roomy.widened_rows < counts.widened_rows


def test_rows_that_are_not_finite_are_scored_in_full() -> None:
    sae = _sae(32, 128, 8, seed=7)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(7))
    x[3, 5], x[11, 0], x[20, 2] = float("nan"), float("inf"), 3e38
    ours, counts = _screened(sae, x)
    assert counts.full_rows >= 2
    _same_features(ours, encode_csr(sae, x))
    assert ours[3].nnz == 0 and ours[20].data.max() > 1e37  # near float32's limit, exact too


def test_the_bound_covers_the_actual_error() -> None:
    """upper_j ≥ the float32 value, checked against float64 dot products on rows of several
    magnitudes (what the proof assumes of the bfloat16 product: float32 accumulation)."""
    d, width = 128, 512
    sae = _sae(d, width, 8, seed=9)
    weights = screen_weights(sae, sae.W_enc)
    assert weights is not None
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(200, d, generator=gen) * 10.0 ** torch.randint(-8, 8, (200, 1), generator=gen)
    bias = sae.b_enc.numpy()
    screened = (x.bfloat16() @ weights.w_bf16).view(torch.int16).numpy()
    real = x.double().numpy() @ sae.W_enc.double().numpy() + bias
    gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
    blocks = width // 8
    upper, top = np.empty(width, dtype=np.float32), np.empty(blocks, dtype=np.float32)
    norms = (weights.norm_hat.max(), weights.norm_err.max(), gamma, UNIT / (1 - UNIT))
    slack = []
    for i in range(len(x)):
        s = (screened[i].astype(np.int32) << 16).astype(np.uint32).view(np.float32)
        xh = x[i].bfloat16().float().numpy()
        terms, c, finite = _row_terms(
            x[i].numpy(), xh, float(np.abs(bias).max()), *norms, weights.abs_max
        )
        assert finite
        assert _bounds(s, bias, weights.norm_hat, weights.norm_err, terms, c, upper, blocks, top)
        assert np.all(upper >= real[i])
        assert np.array_equal(top, upper.reshape(8, blocks).max(axis=0))
        slack.append(np.median((upper - real[i]) / np.abs(real[i] - bias).max()))
    assert np.median(slack) < 0.1  # and it is not vacuous


def test_equal_values_are_picked_as_the_float32_path_picks_them() -> None:
    """Integer inputs and weights of 0 and ±1: every product and sum is exact in bfloat16
    and float32, so many features share the k-th value exactly. The screen (its ranked
    selection, and `_select` where equal values straddle the k-th place) picks what the
    float32 path and a stable sort pick: of equal values, the lower index."""
    d, width, k = 48, 160, 12
    gen = torch.Generator().manual_seed(13)
    w_enc = torch.randint(-1, 2, (d, width), generator=gen).float()
    sae = _sae(d, width, k, seed=13, w_enc=w_enc)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.randint(-2, 3, (300, d), generator=gen).float()
    ours, _ = _screened(sae, x)
    exact = (x @ w_enc).numpy()
    ties = 0
    for row in range(len(x)):
        top = np.sort(np.argsort(-exact[row], kind="stable")[:k])
        kth = exact[row, top].min()
        ties += (exact[row] == kth).sum() > (exact[row, top] == kth).sum()
        top = top[exact[row, top] > 0]
        np.testing.assert_array_equal(ours[row].indices, top)
        np.testing.assert_array_equal(ours[row].data, exact[row, top])
    assert ties > 100  # equal values straddle the k-th place in most rows
    _same_features(ours, encode_csr(sae, x))


def test_the_candidates_floor_leaves_at_least_m_blocks_above_it() -> None:
    """The floor: at least m block maxima reach it on any row (normal, heavy-tailed, a few
    distinct values, all equal, m = n), and on spread rows not many more (m + m/8)."""
    rng = np.random.default_rng(17)
    rows = {
        "normal": rng.normal(3.0, 0.5, (200, 288)),
        "heavy tails": rng.standard_cauchy((200, 288)),
        "skewed": rng.exponential(1.0, (200, 288)) * 10.0 ** rng.integers(-20, 20, (200, 1)),
        "few values": rng.integers(0, 4, (200, 288)),
        "all equal": np.full((3, 288), 7.0),
    }
    for m in (1, 44, 140, 288):
        cut = _normal_cut(m / 288)
        for name, values in rows.items():
            for row in values.astype(np.float32):
                above = int((row >= _floor(row, m, cut)).sum())
                assert above >= m, (name, m)
                if name in ("normal", "heavy tails", "skewed") and m < 288:
                    assert above <= m + m // 8, (name, m, above)
    assert _floor(np.array([1, 2, 3], dtype=np.float32), 3, _normal_cut(1.0)) == 1.0


def test_ranked_selection_by_hand() -> None:
    """`_top_ranked` on five candidates: the top 3 in feature order, ReLU'd, the k-th value
    returned; NaN where equal values straddle the k-th place."""
    chosen = np.array([2, 5, 7, 9, 11], dtype=np.int32)
    bias = np.zeros(12, dtype=np.float32)
    bias[9] = -4.0
    scratch = (np.empty(8, np.float32), np.empty(9, np.int32), np.empty(9, np.float32))
    index, value = np.empty(3, np.int32), np.empty(3, np.float32)
    dots = np.array([0.5, -1.0, 3.0, 6.0, -0.25], dtype=np.float32)  # + bias: 2.0 at 9
    assert _top_ranked(dots, chosen, bias, 3, scratch, index, value) == np.float32(0.5)
    np.testing.assert_array_equal(index, [2, 7, 9])
    np.testing.assert_array_equal(value, np.array([0.5, 3.0, 2.0], dtype=np.float32))
    dots = np.array([1.0, -3.0, -2.0, 5.0, -0.5], dtype=np.float32)  # picks 1.0, 1.0, −0.5
    assert _top_ranked(dots, chosen, bias, 3, scratch, index, value) == np.float32(-0.5)
    np.testing.assert_array_equal(index, [2, 9, 11])
    np.testing.assert_array_equal(value, np.array([1.0, 1.0, 0.0], dtype=np.float32))
    tied = np.array([1.0, 2.0, 1.0, 0.0, 1.0], dtype=np.float32)  # three 1.0s for two places
    assert np.isnan(_top_ranked(tied, chosen, bias, 3, scratch, index, value))


def test_block_scoring_is_the_gather_dot() -> None:
    """The feature-major block scorer gives each (row, candidate) the float32 dot product
    the per-row gather gives, bit for bit, and within float32 rounding of float64's."""
    rng = np.random.default_rng(11)
    rows, d, width = 70, 100, 300
    x = rng.standard_normal((rows, d)).astype(np.float32) * 10.0 ** rng.integers(-3, 4, (rows, 1))
    w_rows = rng.standard_normal((width, d)).astype(np.float32)
    counts = rng.integers(0, 40, rows)
    counts[:3] = (0, 1, width)  # an empty row, a single candidate, every feature
    chosen = np.concatenate([np.sort(rng.choice(width, c, replace=False)) for c in counts])
    chosen = chosen.astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    dots = np.full(len(chosen), np.nan, dtype=np.float32)
    slots = (np.empty(width + 1, np.int64), np.empty(len(chosen), np.int32))
    _score_block(x, w_rows, chosen, offsets, dots, slots[0], slots[1], slots[1].copy())
    row = np.repeat(np.arange(rows), counts)
    exact = np.einsum("pd,pd->p", x[row].astype(np.float64), w_rows[chosen].astype(np.float64))
    size = np.einsum("pd,pd->p", np.abs(x[row]).astype(np.float64), np.abs(w_rows[chosen]))
    assert np.all(np.abs(dots - exact) <= d * 2.0**-24 * size)
    gathered = np.empty(len(chosen), dtype=np.float32)
    for r in range(rows):  # the per-row scorer, four features at a time (padded)
        part = chosen[offsets[r] : offsets[r + 1]]
        padded = np.concatenate([part, np.repeat(part[-1:], -len(part) % 4)]).astype(np.int32)
        out = np.empty(len(padded), dtype=np.float32)
        for m in range(0, len(padded), 4):
            _dots4(x[r], w_rows, padded, m, out)
        gathered[offsets[r] : offsets[r + 1]] = out[: len(part)]
    np.testing.assert_array_equal(dots, gathered)


def test_resolve_screen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(screen_module, "bf16_is_fast", lambda: True)
    assert resolve_screen("auto", "cpu") == "bf16"
    assert resolve_screen("auto", "cuda") == "off"
    monkeypatch.setattr(screen_module, "bf16_is_fast", lambda: False)
    assert resolve_screen("auto", "cpu") == "off"
    assert resolve_screen("bf16", "cpu") == "bf16"
    with pytest.raises(CoactError, match="CPU only"):
        resolve_screen("bf16", "cuda")
    with pytest.raises(CoactError, match="screen must be one of"):
        resolve_screen("fp8", "cpu")


def test_a_screened_store_is_not_resumed_without_the_screen(tmp_path: Path) -> None:
    lm = load_model("tiny-llama")
    tokens = torch.randint(1, 200, (16, 16), generator=torch.Generator().manual_seed(0))
    contexts = Contexts(tokens, torch.zeros_like(tokens, dtype=torch.int32), "random", "r", 1)
    saes = {Site("mlp_resid", 1): _sae(64, 256, 8, 1), Site("mlp_out", 1): _sae(64, 256, 8, 2)}
    base = dataclasses.replace(CollectConfig(), forward_batch=4, shard_contexts=8)
    screened = dataclasses.replace(base, screen="bf16")
    plain = dataclasses.replace(base, screen="off")
    one = collect_codes(lm, contexts, saes, tmp_path / "a", screened)
    two = collect_codes(lm, contexts, saes, tmp_path / "b", plain)
    assert one.meta["screen"] == "bf16" and two.meta["screen"] == "off"
    assert one.fingerprint != two.fingerprint
    for slug in one.sites:
        _same_features(one.read_site(slug), two.read_site(slug))
    with pytest.raises(CoactError, match="collected with screen 'bf16'"):
        collect_codes(lm, contexts, saes, tmp_path / "a", plain)
    with pytest.raises(CoactError, match="collected with screen 'off'"):
        collect_codes(lm, contexts, saes, tmp_path / "b", screened)
    auto = dataclasses.replace(base, screen="auto")  # "auto" resumes a store as written
    for name, store in (("a", one), ("b", two)):
        again = collect_codes(lm, contexts, saes, tmp_path / name, auto)
        assert again.fingerprint == store.fingerprint
        assert again.meta["screen"] == store.meta["screen"]
    legacy = collection_fingerprint(model_fingerprint(lm), contexts, saes, base)
    assert two.fingerprint == legacy  # "off" hashes as before the setting existed
    half = tmp_path / "half"  # an interrupted screened store finishes screened under "auto"
    collect_codes(lm, contexts, saes, half, screened)
    last = CodeStore.open(half).manifest["shards"][-1]
    (half / next(iter(last["files"]))).unlink()  # as if the run had stopped before it
    resumed = collect_codes(lm, contexts, saes, half, auto)
    for slug in one.sites:
        assert resumed.read_site(slug).data.tobytes() == one.read_site(slug).data.tobytes()


def test_codes_do_not_depend_on_how_rows_are_grouped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The screen encodes a shard's batches together (SCREEN_ROWS at a time): one call on
    every row and calls on pieces give the same bytes, and so do collections whose groups
    differ, or that encode batch by batch."""
    sae = _sae(64, 256, 8, seed=13)
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(13))
    whole = encode_csr(sae, x, screen="bf16")
    pieces = sp.vstack([encode_csr(sae, x[i : i + 70], screen="bf16") for i in range(0, 300, 70)])
    assert whole.data.tobytes() == sp.csr_matrix(pieces).data.tobytes()
    np.testing.assert_array_equal(whole.indices, sp.csr_matrix(pieces).indices)
    lm = load_model("tiny-llama")
    tokens = torch.randint(1, 200, (24, 16), generator=torch.Generator().manual_seed(0))
    contexts = Contexts(tokens, torch.zeros_like(tokens, dtype=torch.int32), "random", "r", 1)
    saes = {Site("mlp_resid", 1): _sae(64, 256, 8, 1), Site("mlp_out", 1): _sae(64, 256, 8, 2)}
    config = dataclasses.replace(CollectConfig(), forward_batch=4, shard_contexts=12, screen="bf16")
    stores = {}
    for rows in (16384, 100, 1):  # a shard in one group; groups of two batches; no groups
        monkeypatch.setattr(collect_module, "SCREEN_ROWS", rows)
        collect_codes(lm, contexts, saes, tmp_path / str(rows), config)
        files = sorted((tmp_path / str(rows)).rglob("*.safetensors"))
        stores[rows] = {str(p.relative_to(tmp_path / str(rows))): p.read_bytes() for p in files}
    assert len(stores[100]) == 6 and stores[100] == stores[16384] == stores[1]


def test_non_finite_activations_stop_a_screened_collection(tmp_path: Path) -> None:
    """Rows copied for the screen as the pass reaches them are checked as read sites are:
    one clear error naming the site, and no shard written."""
    lm = load_model("tiny-llama", seed=5)
    with torch.no_grad():
        resolve(lm.model, f"{lm.adapter.block(1)}.mlp.down_proj").weight[0, 0] = float("nan")
    tokens = torch.randint(1, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    contexts = Contexts(tokens, torch.zeros_like(tokens, dtype=torch.int32), "random", "r", 1)
    saes = {Site("mlp_resid", 1): _sae(64, 256, 8, 1), Site("mlp_out", 1): _sae(64, 256, 8, 2)}
    config = dataclasses.replace(CollectConfig(), forward_batch=4, shard_contexts=4, screen="bf16")
    with pytest.raises(CoactError, match=r"non-finite \(NaN or inf\) activations at mlp_out\[1\]"):
        collect_codes(lm, contexts, saes, tmp_path / "codes", config)
    assert not list((tmp_path / "codes").rglob("*.safetensors"))


def test_a_non_finite_first_position_stops_a_screened_collection(tmp_path: Path) -> None:
    """The BOS position is not encoded, yet a NaN there is an error on the screen's path as
    it is where `read_sites` reads a batch: the whole activation is checked."""
    lm = load_model("tiny-llama", seed=5)
    mlp = resolve(lm.model, f"{lm.adapter.block(1)}.mlp")

    def poison(_m: object, _a: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, 0, 0] = float("nan")
        return out

    handle = mlp.register_forward_hook(poison)
    tokens = torch.randint(1, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    contexts = Contexts(tokens, torch.zeros_like(tokens, dtype=torch.int32), "random", "r", 1)
    saes = {Site("mlp_resid", 1): _sae(64, 256, 8, 1), Site("mlp_out", 1): _sae(64, 256, 8, 2)}
    config = dataclasses.replace(CollectConfig(), forward_batch=4, shard_contexts=4, screen="bf16")
    try:
        with pytest.raises(CoactError, match=r"non-finite \(NaN or inf\) activations at mlp_out"):
            collect_codes(lm, contexts, saes, tmp_path / "codes", config)
    finally:
        handle.remove()
    assert not list((tmp_path / "codes").rglob("*.safetensors"))
