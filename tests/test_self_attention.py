"""Self-only attention: the adapter's closed form against the real attention module, and
the per-feature comparison table against brute-force recomputation. Resampled context: the
tracing primitive (attention fed another stream), the table against one-sequence brute
force, and known answers on planted attention and on a sink pattern."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from torch import Tensor
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from coact.block.self_attention import (
    ResampleConfig,
    SelfOnlyConfig,
    resample_check,
    resample_donors,
    resample_summary,
    resample_targets,
    self_only_check,
    self_only_summary,
)
from coact.errors import CoactError
from coact.models.adapters import Adapter, adapter_for
from coact.models.load import TINY_MODELS, LoadedModel, load_model, tiny_tokenizer
from coact.models.sites import Site
from coact.models.tracing import attention_output_with_input, capture
from coact.sae.base import Sae
from tests.planted_model import planted_attention, random_tokens


def _random_biases(lm: LoadedModel) -> LoadedModel:
    """Random init leaves biases at zero; make them count so a dropped b_v or b_o shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return lm


def _models() -> list[LoadedModel]:
    return [_random_biases(load_model(name)) for name in TINY_MODELS]


def _grouped_qwen2() -> LoadedModel:
    """Qwen2 with biases on q/k/v and 8 query heads sharing 2 kv heads (groups of 4)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=2, eos_token_id=0,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    return _random_biases(
        LoadedModel("tiny-qwen2-gqa", model, tiny_tokenizer(), adapter_for(model))
    )


@pytest.fixture(scope="module")
def models() -> list[LoadedModel]:
    return [*_models(), _grouped_qwen2()]


def _real_and_self_only(lm: LoadedModel, tokens: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    acts = capture(lm, tokens, [Site("resid_pre", layer), Site("attn_out", layer)])
    with torch.no_grad():
        own = lm.adapter.self_only_attention(lm.model, layer, acts[Site("resid_pre", layer)])
    return acts[Site("attn_out", layer)], own


@contextmanager
def _identity_attention(sink: bool = False) -> Iterator[None]:
    """Every model's sdpa attention with a diagonal mask: each position attends to itself
    only (and to position 0, the BOS sink, if `sink`), through the model's own code (its
    q/k/v split, repeat_kv, head merge)."""
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def identity(module: Any, query: Tensor, key: Tensor, value: Tensor, mask: Any, **kw: Any):
        eye = torch.eye(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
        eye[:, 0] |= sink
        return sdpa(module, query, key, value, eye, **{**kw, "is_causal": False})

    ALL_ATTENTION_FUNCTIONS["sdpa"] = identity
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]  # drops the local override only


def test_closed_form_is_attention_on_one_token(models: list[LoadedModel]) -> None:
    """On contexts of length 1 attention can only see the token itself."""
    tokens = torch.randint(3, 259, (6, 1), generator=torch.Generator().manual_seed(0))
    for lm in models:
        assert lm.model.config._attn_implementation == "sdpa"
        for layer in range(lm.adapter.n_layers):
            real, own = _real_and_self_only(lm, tokens, layer)
            assert own.shape == real.shape == (6, 1, lm.adapter.d_model)
            torch.testing.assert_close(own, real, msg=f"{lm.name} layer {layer}")


def test_closed_form_is_attention_with_identity_pattern(models: list[LoadedModel]) -> None:
    """On 16 positions, the model's attention forced to the identity pattern gives the
    closed form everywhere; the real (causal) pattern only at position 0."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.stack([3 + torch.randperm(256, generator=gen)[:16] for _ in range(3)])
    for lm in models:
        for layer in range(lm.adapter.n_layers):
            real, own = _real_and_self_only(lm, tokens, layer)
            torch.testing.assert_close(own[:, 0], real[:, 0])
            gap = (own[:, 1:] - real[:, 1:]).abs().amax(dim=-1)
            assert (gap > 1e-4).all(), f"{lm.name} layer {layer}: attention looks self-only"
            with _identity_attention():
                forced, own_forced = _real_and_self_only(lm, tokens, layer)
            torch.testing.assert_close(own_forced, forced, msg=f"{lm.name} layer {layer}")
    real, own = _real_and_self_only(models[0], tokens, 0)
    assert (real[:, 1:] - own[:, 1:]).abs().amax() > 1e-4  # the override is gone


def test_wrong_grouped_query_layout_is_caught(
    models: list[LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both grouped models (tiny-llama: 4 heads on 2 kv heads; qwen2: 8 on 2) tell the
    repeat_kv layout (head h reads kv head h // group) from tiling (h % n_kv)."""
    grouped = [lm for lm in models if lm.adapter.family in {"llama", "qwen2"}]
    assert [lm.name for lm in grouped] == ["tiny-llama", "tiny-qwen2-gqa"]
    config = grouped[0].model.config
    assert config.num_key_value_heads < config.num_attention_heads
    tokens = torch.randint(3, 259, (4, 1), generator=torch.Generator().manual_seed(2))
    original = Tensor.repeat_interleave

    def tiled(self: Tensor, repeats: Any, dim: int | None = None, **kw: Any) -> Tensor:
        return torch.cat([self] * int(repeats), dim=dim if dim is not None else 0)

    for lm in grouped:
        acts = capture(lm, tokens, [Site("resid_pre", 1), Site("attn_out", 1)])
        resid, real = acts[Site("resid_pre", 1)], acts[Site("attn_out", 1)]
        with torch.no_grad():
            torch.testing.assert_close(lm.adapter.self_only_attention(lm.model, 1, resid), real)
            monkeypatch.setattr(Tensor, "repeat_interleave", tiled)
            wrong = lm.adapter.self_only_attention(lm.model, 1, resid)
            monkeypatch.setattr(Tensor, "repeat_interleave", original)
        assert (wrong - real).abs().amax() > 1e-3, lm.name


def test_unknown_family_is_an_error() -> None:
    lm = load_model("tiny-gpt2")
    fields = {**lm.adapter.__dict__, "family": "other"}
    with pytest.raises(CoactError, match="not implemented for family 'other'"):
        Adapter(**fields).self_only_attention(lm.model, 0, torch.zeros(1, 1, 64))


def _relu_sae(center: Tensor, width: int, seed: int) -> Sae:
    """Random directions through the mean activation `center` (the b_o of random biases
    would otherwise switch each feature on or off for every token alike)."""
    gen = torch.Generator().manual_seed(seed)
    d_model = center.shape[-1]
    sae = Sae(d_model, width, activation="relu")
    with torch.no_grad():
        sae.b_dec.copy_(center)
        sae.W_enc.copy_(torch.randn(d_model, width, generator=gen) * 10)
        sae.b_enc[-1] = -1e3  # a feature that never fires; the others fire about half the time
    return sae


def test_table_matches_brute_force() -> None:
    """Every column recomputed from the codes of all kept tokens at once."""
    lm = _random_biases(load_model("tiny-gpt-neox"))
    tokens = torch.randint(3, 259, (5, 9), generator=torch.Generator().manual_seed(3))
    real, own = _real_and_self_only(lm, tokens, 1)
    sae = _relu_sae(real[:, 1:].mean((0, 1)), 12, seed=3)
    config = SelfOnlyConfig(batch_size=2, skip_first_positions=1, progress=False)
    table = self_only_check(lm, sae, tokens, 1, config)
    assert table.columns == [
        "feature", "active", "self_active", "sum_sq_real", "sum_sq_error", "self_only_fvu", "kept",
    ]  # fmt: skip
    assert table["feature"].to_list() == list(range(12))

    with torch.no_grad():
        c = sae.encode(real[:, 1:]).reshape(-1, 12).double().numpy()
        c_self = sae.encode(own[:, 1:]).reshape(-1, 12).double().numpy()
    assert c.shape[0] == 5 * 8
    np.testing.assert_array_equal(table["active"].to_numpy(), (c > 0).sum(0))
    np.testing.assert_array_equal(table["self_active"].to_numpy(), (c_self > 0).sum(0))
    np.testing.assert_allclose(table["sum_sq_real"].to_numpy(), (c**2).sum(0), rtol=1e-4)
    error = ((c - c_self) ** 2).sum(0)
    np.testing.assert_allclose(table["sum_sq_error"].to_numpy(), error, rtol=1e-4)
    alive = np.asarray((c > 0).any(0))
    assert alive[:-1].sum() >= 8 and not alive[-1]
    variance = ((c - c.mean(0)) ** 2).sum(0)
    fvu = table["self_only_fvu"].to_numpy()
    np.testing.assert_allclose(fvu[alive], error[alive] / variance[alive], rtol=1e-4)
    assert np.isnan(fvu[~alive]).all()
    kept = table["kept"].to_numpy()
    mass = np.minimum(c, c_self).sum(0)[alive] / c.sum(0)[alive]
    np.testing.assert_allclose(kept[alive], mass, rtol=1e-4)
    assert np.isnan(kept[~alive]).all()
    assert (fvu[alive] > 0).all()  # attention over 9 positions is not self-only here


def test_one_token_contexts_are_self_only() -> None:
    """Length-1 contexts with nothing skipped: self-only attention is the real one, so every
    alive feature has fvu 0 and keeps all of its mass."""
    lm = _random_biases(load_model("tiny-llama"))
    tokens = torch.randint(3, 259, (40, 1), generator=torch.Generator().manual_seed(4))
    sae = _relu_sae(_real_and_self_only(lm, tokens, 2)[0].mean((0, 1)), 10, seed=4)
    config = SelfOnlyConfig(batch_size=16, skip_first_positions=0, progress=False)
    table = self_only_check(lm, sae, tokens, 2, config)
    alive = table.filter(pl.col("active") > 0)
    assert alive.height >= 7
    np.testing.assert_allclose(alive["self_only_fvu"].to_numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(alive["kept"].to_numpy(), 1.0, rtol=1e-6)
    assert alive["self_active"].to_list() == alive["active"].to_list()
    summary = self_only_summary(table)
    assert summary.alive == alive.height
    assert summary.percent_self_only == 100.0
    assert summary.median_self_only_fvu == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs_are_errors() -> None:
    lm = load_model("tiny-gpt2")
    sae = _relu_sae(torch.zeros(64), 4, seed=5)
    with pytest.raises(CoactError, match="leave none"):
        self_only_check(lm, sae, torch.zeros(2, 1, dtype=torch.long), 0, SelfOnlyConfig())
    with pytest.raises(CoactError, match="out of range"):
        self_only_check(lm, sae, torch.zeros(2, 4, dtype=torch.long), 3, SelfOnlyConfig())
    with pytest.raises(CoactError, match="batch_size"):
        SelfOnlyConfig(batch_size=0)


def test_summary_on_a_hand_made_table() -> None:
    table = pl.DataFrame(
        {
            "feature": [0, 1, 2],
            "active": [3, 5, 0],
            "self_only_fvu": [0.1, 0.6, math.nan],
        }
    )
    summary = self_only_summary(table)
    assert summary.to_dict() == {
        "features": 3,
        "alive": 2,
        "threshold": 0.5,
        "self_only": 1,
        "percent_self_only": 50.0,
        "median_self_only_fvu": pytest.approx(0.35),
    }
    assert self_only_summary(table, threshold=0.7).percent_self_only == 100.0
    dead = self_only_summary(table.filter(pl.col("active") == 0))
    assert dead.alive == 0 and math.isnan(dead.percent_self_only)


# Resampled context.


def test_attention_primitive_reads_the_given_stream() -> None:
    """Fed the captured resid_pre, attention returns the captured attn_out exactly; a
    stream changed after t leaves the output up to t alone (causal attention), one changed
    at an earlier position moves it at t (and nowhere before that position)."""
    tokens = random_tokens(2, 10, seed=6)
    noise = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(6))
    for name in ("tiny-llama", "tiny-gpt-neox"):
        lm = _random_biases(load_model(name))
        for layer in range(lm.adapter.n_layers):
            resid, attn = Site("resid_pre", layer), Site("attn_out", layer)
            acts = capture(lm, tokens, [resid, attn])
            stream, real = acts[resid], acts[attn]
            same = attention_output_with_input(lm, tokens, layer, stream.clone())
            assert torch.equal(same, real), f"{name} layer {layer}"
            later = stream.clone()
            later[:, 6:] += noise[:, 6:]
            out = attention_output_with_input(lm, tokens, layer, later)
            torch.testing.assert_close(out[:, :6], real[:, :6], rtol=0, atol=1e-6)
            assert (out[:, 6:] - real[:, 6:]).abs().amax(-1).min() > 1e-4
            earlier = stream.clone()
            earlier[:, 3] += noise[:, 3]
            out = attention_output_with_input(lm, tokens, layer, earlier)
            torch.testing.assert_close(out[:, :3], real[:, :3], rtol=0, atol=1e-6)
            assert (out[:, 5] - real[:, 5]).abs().amax() > 1e-4, f"{name} layer {layer}"
    with pytest.raises(CoactError, match="stream must be"):
        attention_output_with_input(lm, tokens, 0, torch.zeros(2, 9, 64))


def test_donors_and_targets() -> None:
    for n in (2, 3, 7):
        for seed in range(5):
            donors = resample_donors(n, seed)
            assert sorted(donors.tolist()) == list(range(n))  # a permutation
            assert (donors != torch.arange(n)).all()  # never itself
            shift = {(d - i) % n for i, d in enumerate(donors.tolist())}
            assert len(shift) == 1  # one shift for all
    assert resample_donors(2, 0).tolist() == [1, 0]
    assert len({resample_donors(7, seed)[0].item() for seed in range(20)}) > 2
    assert resample_targets(10, 4, 1).tolist() == [2, 4, 7, 9]  # linspace(2, 9, 4), rounded
    assert resample_targets(5, 8, 1).tolist() == [2, 3, 4]  # fewer positions than targets
    assert resample_targets(12, 1, 0).tolist() == [11]  # the last one
    assert resample_targets(3, 8, 0).tolist() == [1, 2]


def _brute_force_resample(
    lm: LoadedModel, sae: Sae, tokens: Tensor, layer: int, config: ResampleConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Real and resampled codes of every (context, target) pair, each patched stream built
    by hand and run as its own one-sequence batch."""
    resid, attn = Site("resid_pre", layer), Site("attn_out", layer)
    acts = capture(lm, tokens, [resid, attn])
    donors = resample_donors(tokens.shape[0], config.seed)
    skip = config.skip_first_positions
    real, resampled = [], []
    for i in range(tokens.shape[0]):
        for t in resample_targets(tokens.shape[1], config.targets, skip).tolist():
            stream = acts[resid][i].clone()
            stream[skip:t] = acts[resid][donors[i], skip:t]
            out = attention_output_with_input(lm, tokens[i : i + 1], layer, stream[None])
            real.append(acts[attn][i, t])
            resampled.append(out[0, t])
    with torch.no_grad():
        c = sae.encode(torch.stack(real)).double().numpy()
        c_res = sae.encode(torch.stack(resampled)).double().numpy()
    return c, c_res


def test_resample_table_matches_brute_force() -> None:
    """Every column recomputed from one-sequence runs of hand-patched streams, on a
    sequential (llama) and a parallel-residual (gpt-neox) model, over batches of 2 contexts
    whose donors sit in other batches."""
    tokens = random_tokens(5, 9, seed=7)
    config = ResampleConfig(batch_size=2, targets=3, skip_first_positions=1, seed=3, progress=False)
    assert resample_targets(9, 3, 1).tolist() == [2, 5, 8]
    for name in ("tiny-llama", "tiny-gpt-neox"):
        lm = _random_biases(load_model(name))
        real = capture(lm, tokens, [Site("attn_out", 1)])[Site("attn_out", 1)]
        sae = _relu_sae(real[:, 1:].mean((0, 1)), 12, seed=7)
        table = resample_check(lm, sae, tokens, 1, config)
        assert table.columns == [
            "feature", "active", "resample_active", "sum_sq_real", "sum_sq_error",
            "resample_fvu", "kept",
        ]  # fmt: skip
        c, c_res = _brute_force_resample(lm, sae, tokens, 1, config)
        assert c.shape == (5 * 3, 12)
        np.testing.assert_array_equal(table["active"].to_numpy(), (c > 0).sum(0))
        np.testing.assert_array_equal(table["resample_active"].to_numpy(), (c_res > 0).sum(0))
        np.testing.assert_allclose(table["sum_sq_real"].to_numpy(), (c**2).sum(0), rtol=1e-4)
        error = ((c - c_res) ** 2).sum(0)
        np.testing.assert_allclose(table["sum_sq_error"].to_numpy(), error, rtol=1e-4)
        alive = np.asarray((c > 0).any(0))
        assert alive[:-1].sum() >= 8 and not alive[-1], name
        variance = ((c - c.mean(0)) ** 2).sum(0)
        fvu = table["resample_fvu"].to_numpy()
        np.testing.assert_allclose(fvu[alive], error[alive] / variance[alive], rtol=1e-4)
        assert np.isnan(fvu[~alive]).all()
        kept = table["kept"].to_numpy()
        mass = np.minimum(c, c_res).sum(0)[alive] / c.sum(0)[alive]
        np.testing.assert_allclose(kept[alive], mass, rtol=1e-4)
        assert (fvu[alive] > 1e-3).all(), name  # random attention reads earlier tokens


def test_planted_position_local_attention_survives_resampling() -> None:
    """Planted attention writing B·c_in[t] reads only position t, which resampling keeps:
    every feature's codes come back exactly (fvu 0, all mass kept)."""
    plant = planted_attention("current")
    tokens = random_tokens(24, 24, seed=8)
    config = ResampleConfig(batch_size=8, targets=8, progress=False)
    table = resample_check(plant.lm, plant.sae_out, tokens, plant.layer, config)
    alive = table.filter(pl.col("active") > 0)
    assert alive.height == table.height == 32
    np.testing.assert_allclose(alive["resample_fvu"].to_numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(alive["kept"].to_numpy(), 1.0, rtol=1e-6)
    assert alive["resample_active"].to_list() == alive["active"].to_list()
    summary = resample_summary(table)
    assert summary.context_free == 32 and summary.percent_context_free == 100.0


def test_planted_previous_token_attention_is_lost_by_resampling() -> None:
    """Planted attention writing c = B·c_in[t − 1]: every target t ≥ 2 has t − 1 among the
    resampled positions, so the resampled code is c' = B·c_in'[t − 1] of the donor, an
    independent context with the same distribution. Then E(c − c')² = Var c + Var c' =
    2 Var c, so fvu ≈ 2 for every feature (kept ≈ E min(c, c') / E c, small for sparse
    features). Seen: fvu 1.7–2.1 on 384 pairs; 1.0 leaves room for sampling noise."""
    plant = planted_attention("previous")
    tokens = random_tokens(48, 24, seed=5)
    config = ResampleConfig(batch_size=8, targets=8, progress=False)
    table = resample_check(plant.lm, plant.sae_out, tokens, plant.layer, config)
    alive = table.filter(pl.col("active") > 0)
    assert alive.height == 32 and alive["active"].min() >= 50  # type: ignore[operator]
    fvu = alive["resample_fvu"].to_numpy()
    assert (fvu > 1.0).all() and (fvu < 3.0).all(), (fvu.min(), fvu.max())
    assert abs(float(np.median(fvu)) - 2.0) < 0.25
    assert (alive["kept"].to_numpy() < 0.6).all()
    summary = resample_summary(table)
    assert summary.context_free == 0 and summary.median_resample_fvu > 1.5


def test_sink_heads_fail_self_only_but_survive_resampling() -> None:
    """Every head forced to attend to the BOS sink and to the token itself: no content of
    other tokens is read, so resampling changes nothing (fvu 0), while self-only attention,
    which drops the sink's value, changes the codes (fvu > 0): why both checks."""
    lm = _random_biases(load_model("tiny-llama"))
    tokens = random_tokens(8, 12, seed=9)
    with _identity_attention(sink=True):
        real = capture(lm, tokens, [Site("attn_out", 1)])[Site("attn_out", 1)]
        sae = _relu_sae(real[:, 1:].mean((0, 1)), 10, seed=9)
        config = ResampleConfig(batch_size=4, targets=4, progress=False)
        resampled = resample_check(lm, sae, tokens, 1, config)
        self_only = self_only_check(lm, sae, tokens, 1, SelfOnlyConfig(progress=False))
    alive = resampled.filter(pl.col("active") > 0)
    assert alive.height >= 7
    np.testing.assert_allclose(alive["resample_fvu"].to_numpy(), 0.0, atol=1e-6)
    fvu = self_only.filter(pl.col("active") > 0)["self_only_fvu"].to_numpy()
    assert (fvu > 1e-2).all(), fvu
    table = resample_check(lm, sae, tokens, 1, config)  # the real, causal pattern
    assert (table.filter(pl.col("active") > 0)["resample_fvu"].to_numpy() > 1e-3).all()


def test_resample_bad_inputs_are_errors() -> None:
    lm = load_model("tiny-gpt2")
    sae = _relu_sae(torch.zeros(64), 4, seed=5)
    config = ResampleConfig(progress=False)
    with pytest.raises(CoactError, match=r"at least 2 contexts .*got 1$"):
        resample_check(lm, sae, torch.zeros(1, 8, dtype=torch.long), 0, config)
    with pytest.raises(CoactError, match="leave none"):
        resample_check(lm, sae, torch.zeros(3, 2, dtype=torch.long), 0, config)
    with pytest.raises(CoactError, match="must be"):
        resample_check(lm, sae, torch.zeros(3, dtype=torch.long), 0, config)
    with pytest.raises(CoactError, match="out of range"):
        resample_check(lm, sae, torch.zeros(2, 4, dtype=torch.long), 3, config)
    for bad in ({"targets": 0}, {"batch_size": 0}, {"skip_first_positions": -1}):
        with pytest.raises(CoactError, match="targets ≥ 1"):
            ResampleConfig(**bad)  # type: ignore[arg-type]


def test_resample_summary_on_a_hand_made_table() -> None:
    table = pl.DataFrame(
        {
            "feature": [0, 1, 2, 3],
            "active": [3, 5, 0, 2],
            "resample_fvu": [0.1, 1.9, math.nan, 0.5],
        }
    )
    assert resample_summary(table).to_dict() == {
        "features": 4,
        "alive": 3,
        "threshold": 0.5,
        "context_free": 2,
        "percent_context_free": pytest.approx(200 / 3),
        "median_resample_fvu": 0.5,
    }
    assert resample_summary(table, threshold=0.05).context_free == 0
    dead = resample_summary(table.filter(pl.col("active") == 0))
    assert dead.alive == 0 and math.isnan(dead.percent_context_free)
    assert math.isnan(dead.median_resample_fvu)
