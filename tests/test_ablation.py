"""Context ablation against answers known by construction and by brute force."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from torch import Tensor, nn

from coact.codes.collect import CollectConfig, collect_codes
from coact.codes.corpus import Contexts
from coact.codes.store import CodeStore
from coact.evidence.ablation import AblationConfig, ablate, most_important, neutral_token, variants
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.sae.base import Sae

A = 40  # the token the hand-built feature looks for, two places back
SITE = Site("mlp_resid", 0)
SCALE = 8.0  # RMSNorm of 5·e0 in 64 dimensions: coordinate 0 becomes √64 = 8 (eps aside)


class CopyTwoBack(nn.Module):
    """Stands in for layer 0's attention: writes coordinate 0 of the (normed) stream two
    positions back into coordinate 1, and nothing else."""

    def forward(self, hidden_states: Tensor, *args: object, **kwargs: object) -> tuple:
        out = torch.zeros_like(hidden_states)
        out[:, 2:, 1] = hidden_states[:, :-2, 0]
        return out, None


def _hand_model() -> tuple[LoadedModel, Sae]:
    """mlp_resid[0] coordinate 1 = 8 · [token two back is A], so the SAE feature 0 that
    reads coordinate 1 fires exactly when A is two tokens back."""
    lm = load_model("tiny-llama")
    assert getattr(lm, "_nnsight", None) is None
    model = lm.model
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, :2] = 0.0
        emb[A] = 0.0
        emb[A, 0] = 5.0
    model.model.layers[0].self_attn = CopyTwoBack()
    sae = Sae(64, 4, activation="relu", site=str(SITE))
    with torch.no_grad():
        sae.W_enc[1, 0] = 1.0
        sae.W_dec[0, 1] = 1.0
    return lm, sae.eval().requires_grad_(False)


def _contexts(rows: list[list[int]]) -> Contexts:
    tokens = torch.tensor(rows, dtype=torch.int64)
    digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    return Contexts(tokens, torch.zeros_like(tokens, dtype=torch.int32), "test", digest, 1)


def _random_rows(n: int, length: int, seed: int, avoid: set[int]) -> list[list[int]]:
    gen = np.random.default_rng(seed)
    allowed = np.array([i for i in range(3, 259) if i not in avoid])
    return [[2, *gen.choice(allowed, length - 1).tolist()] for _ in range(n)]


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Sae, Path, Contexts]:
    lm, sae = _hand_model()
    filler = neutral_token(lm.tokenizer, " ")
    rows = _random_rows(4, 16, 0, {A, filler})
    rows[0][5] = A  # feature 0 fires at position 7 of context 0
    rows[2][10] = A  # and at position 12 of context 2
    contexts = _contexts(rows)
    store_dir = tmp_path_factory.mktemp("ablate") / "codes"
    collect_codes(lm, contexts, {SITE: sae}, store_dir, CollectConfig(forward_batch=2))
    return lm, sae, store_dir, contexts


def test_hand_built_feature_depends_on_the_token_two_back(hand, tmp_path: Path) -> None:
    lm, sae, store_dir, contexts = hand
    config = AblationConfig(contexts=4, window=4, batch_size=5, progress=False)
    headline = ablate(lm, {SITE: sae}, store_dir, {(SITE.slug, 0): 4}, tmp_path, config)
    table = pl.read_parquet(tmp_path / "ablation.parquet")
    assert headline.contexts == 2  # it fires in two contexts only
    assert headline.max_clean_mismatch < 1e-5
    assert set(table["context"]) == {0, 2}
    assert sorted(set(zip(table["context"], table["position"], strict=True))) == [(0, 7), (2, 12)]
    assert table["clean"].to_numpy() == pytest.approx(SCALE, rel=1e-4)  # RMSNorm eps
    for mode, dropped in (("replace", {2}), ("remove", {1, 2})):
        rows = table.filter(pl.col("mode") == mode)
        assert sorted(rows["ablated_offset"].unique()) == [1, 2, 3, 4]
        for r in rows.iter_rows(named=True):
            expected = SCALE if r["ablated_offset"] in dropped else 0.0
            assert r["drop"] == pytest.approx(expected, rel=1e-4, abs=1e-5), (mode, r)
            assert r["ablated_id"] == int(contexts.tokens[r["context"], r["ablated_position"]])
    hit = table.filter((pl.col("mode") == "replace") & (pl.col("ablated_offset") == 2))
    assert hit["ablated_id"].to_list() == [A, A] and hit["drop_fraction"].to_list() == [1.0, 1.0]
    best = most_important(table).filter(pl.col("mode") == "replace")
    assert best["ablated_offset"].to_list() == [2, 2]


def test_rebuilt_contexts_match_the_collected_ones(hand, tmp_path: Path) -> None:
    lm, sae, store_dir, contexts = hand
    config = AblationConfig(window=3, modes=("replace",), progress=False)
    wanted = {(SITE.slug, 0): 2}
    ablate(lm, {SITE: sae}, store_dir, wanted, tmp_path / "a", config)
    ablate(lm, {SITE: sae}, store_dir, wanted, tmp_path / "b", config, tokens=contexts.tokens)
    a = pl.read_parquet(tmp_path / "a" / "ablation.parquet")
    b = pl.read_parquet(tmp_path / "b" / "ablation.parquet")
    assert a.equals(b) and set(a["mode"]) == {"replace"}


def test_finished_result_is_reused_and_a_new_config_redone(hand, tmp_path: Path) -> None:
    lm, sae, store_dir, _ = hand
    config = AblationConfig(window=2, progress=False)
    wanted = {(SITE.slug, 0): 1}
    first = ablate(lm, {SITE: sae}, store_dir, wanted, tmp_path, config)
    again = ablate(lm, {SITE: sae}, store_dir, wanted, tmp_path, config)
    assert again.key == first.key and again.seconds == first.seconds  # reused
    other = ablate(lm, {SITE: sae}, store_dir, wanted, tmp_path, AblationConfig(window=3))
    assert other.key != first.key
    assert json.loads((tmp_path / "ablation.json").read_text())["key"] == other.key


def test_variants_never_touch_bos_and_shift_on_remove() -> None:
    tokens = np.arange(10, 20)
    got = variants(0, tokens, 3, AblationConfig(window=5, modes=("remove", "replace")), filler=99)
    assert [(v.mode, v.offset) for v in got] == [
        (None, 0), ("remove", 1), ("replace", 1), ("remove", 2), ("replace", 2)
    ]  # fmt: skip
    clean, remove1, replace1 = got[0], got[1], got[2]
    assert clean.tokens.tolist() == [10, 11, 12, 13] and clean.read == 3
    assert remove1.tokens.tolist() == [10, 11, 13] and remove1.read == 2
    assert replace1.tokens.tolist() == [10, 11, 99, 13] and replace1.read == 3


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_batched_ablation_equals_one_sequence_at_a_time(model: str, tmp_path: Path) -> None:
    """A random model and SAE at mlp_out[1]: every ablated value equals a forward pass of
    that one sequence, built by hand, with no padding and no batching."""
    lm = load_model(model, seed=1)
    site = Site("mlp_out", 1)
    gen = torch.Generator().manual_seed(0)
    sae = Sae(64, 32, activation="relu", site=str(site))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(64, 32, generator=gen))
        sae.W_dec.copy_(torch.randn(32, 64, generator=gen))
    sae.requires_grad_(False)
    contexts = _contexts(_random_rows(6, 20, 1, set()))
    collect_codes(lm, contexts, {site: sae}, tmp_path / "codes", CollectConfig(forward_batch=3))
    filler = neutral_token(lm.tokenizer, " ")
    config = AblationConfig(window=5, batch_size=7, progress=False)
    active = np.diff(CodeStore.open(tmp_path / "codes").read_site(site.slug).tocsc().indptr)
    busiest = np.argsort(-active, kind="stable")[:2]
    assert active[busiest].min() >= 3
    wanted = {(site.slug, int(busiest[0])): 3, (site.slug, int(busiest[1])): 2}
    ablate(lm, {site: sae}, tmp_path / "codes", wanted, tmp_path / "out", config)
    table = pl.read_parquet(tmp_path / "out" / "ablation.parquet")
    assert table.height > 0

    def value(tokens: list[int], at: int, feature: int) -> float:
        acts = capture(lm, torch.tensor([tokens]), [site])[site][0, at]
        return float(sae.encode(acts)[feature])

    for r in table.iter_rows(named=True):
        row = contexts.tokens[r["context"]].tolist()
        p, at = r["position"], r["ablated_position"]
        assert value(row, p, r["feature"]) == pytest.approx(r["clean"], rel=1e-4, abs=1e-5)
        assert r["clean"] == pytest.approx(r["stored"], rel=1e-4, abs=1e-5)
        if r["mode"] == "remove":
            seq = row[:at] + row[at + 1 :]
            expected = value(seq, p - 1, r["feature"])
        else:
            seq = [*row]
            seq[at] = filler
            expected = value(seq, p, r["feature"])
        assert r["ablated"] == pytest.approx(expected, rel=1e-4, abs=1e-5), r
        assert r["drop"] == pytest.approx(r["clean"] - r["ablated"])
