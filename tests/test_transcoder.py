"""Skip transcoders: the trainer recovers a planted sparse map plus a linear skip, its
sparse step has the dense loss's gradients, scales fold away, and the sparsify format
round-trips through coact and through sparsify itself; its latents get the logic
stage's labels."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from coact.codes.collect import CollectConfig, collect_codes
from coact.codes.corpus import Contexts
from coact.codes.store import CodeStore
from coact.errors import CoactError
from coact.jacobian.feature_map import mlp_block
from coact.jacobian.paths import ablation_paths
from coact.logic.config import LogicConfig
from coact.logic.coverage import CoverageSummary
from coact.models.adapters import resolve
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site
from coact.models.tracing import capture, next_token_loss
from coact.pipeline.model_table import _transcoder as layer_columns
from coact.report.transcoder_section import (
    format_transcoder,
    label_table,
    transcoder_section,
    verdict,
)
from coact.sae.base import Sae
from coact.sae.train import SaeTrainConfig
from coact.transcoder.formats import hookpoint, load_transcoder, save_transcoder
from coact.transcoder.labels import label_latents, latent_codes, virtual_table
from coact.transcoder.model import SkipTranscoder
from coact.transcoder.sheet import (
    Models,
    agreement,
    mass_counts,
    mean_norm_jacobian,
    outputs_and_splices,
    virtual_weights,
)
from coact.transcoder.slopes import SlopeConfig, slopes, with_ablation
from coact.transcoder.stage import SheetRow, TranscoderResult, _sheet_frame
from coact.transcoder.train import TranscoderTrainer

STEPS = 300


class _Plant:
    """y = Σ_top-k ReLU(x·e_j + b_j) d_j + S x + c, with x Gaussian: a sparse map and a
    linear skip, each known."""

    def __init__(self, d: int, m: int, k: int, gen: torch.Generator) -> None:
        self.k = k
        self.enc = F.normalize(torch.randn(d, m, generator=gen), dim=0)
        self.bias = -0.5 * torch.ones(m)
        self.dec = F.normalize(torch.randn(m, d, generator=gen), dim=-1) * 3
        self.skip = 0.5 * torch.randn(d, d, generator=gen) / d**0.5
        self.offset = torch.randn(d, generator=gen)

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.enc.shape[0], generator=gen)
        values, idx = torch.relu(x @ self.enc + self.bias).topk(self.k, dim=-1)
        codes = torch.zeros(n, self.enc.shape[1]).scatter_(-1, idx, values)
        return x, codes @ self.dec + x @ self.skip.T + self.offset


def _fvu(y: torch.Tensor, pred: torch.Tensor) -> float:
    return float((y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_trainer_recovers_a_planted_sparse_map_and_its_skip(one_thread: None) -> None:
    gen = torch.Generator().manual_seed(0)
    d, m, k = 16, 24, 3
    plant = _Plant(d, m, k, gen)
    config = SaeTrainConfig(expansion=2, k=k, lr=1e-2, dead_after_tokens=5_000)
    trainer = TranscoderTrainer(*plant.sample(512, gen), config, gen)
    for _ in range(STEPS):
        trainer.step(*plant.sample(512, gen))
    tc = trainer.finish()
    x, y = plant.sample(4096, gen)
    assert _fvu(y, tc(x)) < 0.05
    # the skip path carries the planted linear map (the latents only the sparse part)
    error = (tc.W_skip - plant.skip).norm() / plant.skip.norm()
    assert error < 0.25, f"skip path off by {error:.2f} of its norm"
    # each planted output direction is written by some latent
    cosine = F.normalize(tc.W_dec, dim=-1) @ F.normalize(plant.dec, dim=-1).T
    found = float((cosine.max(0).values > 0.9).float().mean())
    assert found > 0.8, f"only {found:.2f} of the planted latents found"
    # a transcoder without skip explains less of the same map at the same k
    plain = TranscoderTrainer(*plant.sample(512, gen), config, gen, skip=False)
    for _ in range(STEPS):
        plain.step(*plant.sample(512, gen))
    assert _fvu(y, plain.finish()(x)) > _fvu(y, tc(x)) + 0.02


def _dense_loss(trainer: TranscoderTrainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The step's FVU written with full-width codes (no dead latents: AuxK is zero)."""
    tc = trainer.tc
    xs, ys = x / trainer.x_scale, y / trainer.y_scale
    return (ys - tc(xs)).pow(2).sum() / (ys - ys.mean(0)).pow(2).sum()


def test_sparse_step_has_the_gradients_of_the_dense_loss() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(96, 12, generator=gen)
    y = torch.tanh(x @ torch.randn(12, 12, generator=gen)) + 1
    trainer = TranscoderTrainer(x, y, SaeTrainConfig(expansion=4, k=3), gen)
    with torch.no_grad():
        trainer.tc.W_dec.normal_(generator=gen)  # away from the zero start
        trainer.tc.W_skip.normal_(generator=gen)
    for _ in range(3):
        tc = trainer.tc
        tc.zero_grad()
        _dense_loss(trainer, x, y).backward()
        dense = {name: p.grad.clone() for name, p in tc.named_parameters() if p.grad is not None}
        held, trainer.optimizer.step = trainer.optimizer.step, lambda: None
        trainer.step(x, y)
        trainer.optimizer.step = held
        assert set(dense) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"}
        for name, grad in dense.items():
            got = dict(tc.named_parameters())[name].grad
            torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-6, msg=name)
        trainer.optimizer.step()


def test_scales_fold_into_the_weights() -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = 40 * torch.randn(512, 8, generator=gen), 0.01 * torch.randn(512, 8, generator=gen)
    trainer = TranscoderTrainer(x, y, SaeTrainConfig(expansion=2, k=4), gen)
    trainer.step(x, y)
    with torch.no_grad():
        scaled = trainer.tc(x / trainer.x_scale) * trainer.y_scale
        codes = trainer.tc.encode(x / trainer.x_scale)
    tc = trainer.finish()
    torch.testing.assert_close(tc.encode(x), codes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tc(x), scaled, atol=1e-5, rtol=1e-4)


def _random_transcoder(gen: torch.Generator, skip: bool = True) -> SkipTranscoder:
    tc = SkipTranscoder(8, 8, 32, 4, skip=skip, layer=2, metadata={"tokens": 7})
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return tc.requires_grad_(False)


def test_sparsify_format_round_trips_through_coact_and_sparsify(tmp_path) -> None:
    from sparsify import SparseCoder

    gen = torch.Generator().manual_seed(2)
    tc = _random_transcoder(gen)
    folder = save_transcoder(tc, tmp_path / hookpoint(2))
    back = load_transcoder(folder)
    x = torch.randn(64, 8, generator=gen)
    torch.testing.assert_close(back(x), tc(x))
    assert (back.layer, back.k, back.width, back.metadata["tokens"]) == (2, 4, 32, 7)
    theirs = SparseCoder.load_from_disk(folder)
    assert theirs.cfg.transcode and theirs.cfg.skip_connection
    out = theirs(x)
    torch.testing.assert_close(out.sae_out, tc(x), atol=1e-5, rtol=1e-5)
    # and a transcoder sparsify saved itself loads in coact with the same outputs
    theirs.save_to_disk(tmp_path / "theirs" / hookpoint(5))
    mine = load_transcoder(tmp_path / "theirs" / hookpoint(5))
    assert mine.layer == 5
    torch.testing.assert_close(mine(x), out.sae_out, atol=1e-5, rtol=1e-5)


# --- the metric sheet's measurements, on tiny-llama with random dictionaries ---------------


def _sheet_models(layer: int = 1) -> Models:
    lm = load_model("tiny-llama")
    d = lm.adapter.d_model
    gen = torch.Generator().manual_seed(4)

    def sae(site: str) -> Sae:
        made = Sae(d, 4 * d, activation="topk", k=4, site=site)
        with torch.no_grad():
            made.W_enc.copy_(torch.randn(d, 4 * d, generator=gen) / d**0.5)
            made.W_dec.copy_(torch.randn(4 * d, d, generator=gen) / d**0.5)
        return made.requires_grad_(False)

    tc = SkipTranscoder(d, d, 4 * d, 4, layer=layer)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / d)
    tc.requires_grad_(False)
    return Models(lm, layer, sae(f"mlp_resid[{layer}]"), sae(f"mlp_out[{layer}]"), [], tc)


def _tokens(lm: LoadedModel, n: int = 3, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, lm.model.config.vocab_size, (n, seq), generator=torch.Generator())


def test_sheet_fvu_and_splices_match_brute_force() -> None:
    models = _sheet_models()
    lm, tc = models.lm, models.tc
    tokens = _tokens(lm)
    frame = outputs_and_splices(models, tokens, batch_size=2, skip=1, n_boot=20, seed=0)
    rows = {r["route"]: r for r in frame.iter_rows(named=True)}
    acts = capture(lm, tokens, [Site("mlp_in", 1), Site("mlp_out", 1)])
    x, y = (acts[Site(k, 1)][:, 1:].reshape(-1, lm.adapter.d_model) for k in ("mlp_in", "mlp_out"))
    spread = (y - y.mean(0)).pow(2).sum()
    assert rows["transcoder"]["fvu"] == pytest.approx(
        float((y - tc(x)).pow(2).sum() / spread), rel=1e-4
    )
    skip_only = x @ tc.W_skip.T + tc.b_dec
    assert rows["transcoder_skip"]["fvu"] == pytest.approx(
        float((y - skip_only).pow(2).sum() / spread), rel=1e-4
    )
    assert rows["zero"]["fvu"] == pytest.approx(float(y.pow(2).sum() / spread), rel=1e-4)
    assert rows["zero"]["ce_recovered"] == 0.0 and rows["transcoder_skip"]["l0"] == 0.0
    assert 0 < rows["transcoder"]["l0"] <= tc.k
    # the transcoder spliced with a plain forward hook, independent of nnsight
    mlp = resolve(lm.model, lm.adapter.mlp_path(1))

    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        new = out.clone()
        new[:, 1:] = tc(args[0][:, 1:])
        return new

    with torch.no_grad():
        clean = next_token_loss(lm.model(tokens).logits, tokens)[:, 1:].mean()
        handle = mlp.register_forward_hook(hook)
        try:
            spliced = next_token_loss(lm.model(tokens).logits, tokens)[:, 1:].mean()
        finally:
            handle.remove()
    assert rows["transcoder"]["delta_ce"] == pytest.approx(float(spliced - clean), abs=1e-5)


def test_mass_counts_and_agreement_by_hand() -> None:
    mass = np.array([[3.0, 0.0, 1.0], [1.0, 0.0, 1.0], [1.0, 0.0, 2.0]])
    assert mass_counts(mass, 0.6).tolist() == [1, 0, 2]
    assert mass_counts(mass, 0.9).tolist() == [3, 0, 3]
    ref, other = np.array([1.0, -2.0, 3.0, 4.0]), np.array([2.0, -1.0, -3.0, 0.0])
    sign, size, rho = agreement(ref, other, (0.5, 2.0))
    assert (sign, size) == (0.5, 0.5)
    assert rho == pytest.approx(spearmanr(ref, other).statistic)
    assert np.isnan(agreement(ref[:2], other[:2], (0.5, 2.0))[2])


def test_virtual_weights_read_the_encoder_through_the_norms_mean_jacobian() -> None:
    models = _sheet_models()
    streams = torch.randn(5, models.lm.adapter.d_model, generator=torch.Generator().manual_seed(1))
    norm = models.norm()
    each = [torch.autograd.functional.jacobian(lambda v: norm(v[None])[0], row) for row in streams]
    mean = torch.stack(each).mean(0)
    torch.testing.assert_close(mean_norm_jacobian(norm, streams), mean, rtol=1e-4, atol=1e-6)
    expected = models.sae_in.W_dec @ mean.T @ models.tc.W_enc
    torch.testing.assert_close(virtual_weights(models, streams), expected, rtol=1e-4, atol=1e-5)


def test_a_transcoder_equal_to_the_mlp_agrees_with_the_model_everywhere(monkeypatch) -> None:
    """With the model's own MLP in the transcoder's place, its slopes are the model's
    (sign, size, rank all agree; the same linear share) and its ablation response is the
    model's exact one; the SAE route with no weights agrees on nothing."""
    models = _sheet_models()
    monkeypatch.setattr(Models, "transcoder_block", lambda self: mlp_block(self.lm, self.layer))
    tokens = _tokens(models.lm, n=2)
    empty = pl.DataFrame(schema={"output": pl.Int64, "input": pl.Int64, "weight_refit": pl.Float64})
    joined, routes, tc_map, streams = slopes(models, tokens, empty, SlopeConfig(min_tokens=1))
    assert joined.height > 3
    tc, sae = routes["transcoder"], routes["sae"]
    assert (tc.jacobian_sign, tc.jacobian_size) == (1.0, 1.0)
    assert tc.jacobian_spearman == pytest.approx(1.0)
    assert tc.linear_share == sae.linear_share or np.isnan(sae.linear_share)
    assert sae.jacobian_sign == 0.0
    exact = ablation_paths(tc_map, streams, joined.select("output", "input").head(6))
    actual = exact["exact_code_change"].fill_nan(0.0)
    causal = exact.select("output", "input").with_columns(
        actual_mean=actual, predicted_mean=3 * actual, judged=actual != 0
    )
    judged, paths = with_ablation(routes, causal, tc_map, streams, (0.5, 2.0))
    assert paths.height == int((actual != 0).sum()) > 0
    assert (judged["transcoder"].ablation_sign, judged["transcoder"].ablation_size) == (1.0, 1.0)
    assert (judged["sae"].ablation_sign, judged["sae"].ablation_size) == (1.0, 0.0)


# --- the transcoder's latents labelled by the logic stage ---------------------------------


def _planted_latents(n: int = 4000, n_in: int = 8) -> tuple[np.ndarray, SkipTranscoder]:
    """Binary-ish input codes (8 features, each active on 30 % of tokens) and a transcoder
    reading them directly (the input SAE's decoder the identity): latent 0 fires only when
    inputs 0 and 1 both do (AND), latent 2 never fires; latent 1 reads inputs 2 and 3."""
    rng = np.random.default_rng(0)
    x = (rng.random((n, n_in)) < 0.3) * rng.uniform(0.8, 1.1, (n, n_in))
    tc = SkipTranscoder(n_in, 4, 3, 3)
    with torch.no_grad():
        enc = 0.01 * torch.as_tensor(rng.standard_normal((n_in, 3)), dtype=torch.float32)
        enc[[0, 1], 0] = 1.0
        enc[[2, 3], 1] = 1.0
        tc.W_enc.copy_(enc)
        tc.b_enc.copy_(torch.tensor([-1.3, 0.0, -100.0]))
    return x, tc.requires_grad_(False)


def test_a_transcoder_latent_built_as_and_or_or_of_two_inputs_gets_that_label() -> None:
    x, tc = _planted_latents()
    codes = tc.encode(torch.as_tensor(x, dtype=torch.float32)).numpy()
    codes[:, 1] = np.maximum(x[:, 2], x[:, 3])  # latent 1 planted as OR (saturating)
    contexts = np.repeat(np.arange(len(x) // 20), 20)
    virtual = tc.W_enc.numpy().astype(np.float64)  # identity input decoder: V = W_enc
    got = label_latents(
        sp.csr_matrix(x), sp.csr_matrix(codes), virtual, LogicConfig(n_boot=20), contexts
    )
    rows = {r["output"]: r for r in got.features.iter_rows(named=True)}
    assert (rows[0]["label"], sorted(rows[0]["inputs"])) == ("AND", [0, 1])
    assert (rows[1]["label"], sorted(rows[1]["inputs"])) == ("OR", [2, 3])
    assert rows[2]["label"] == "DEAD"
    assert {k: v for k, v in got.counts.items() if v} == {"AND": 1, "OR": 1, "DEAD": 1}
    assert (got.coverage.alive, got.coverage.explained) == (2, 2)
    with pytest.raises(ValueError, match="do not map 8 inputs to 3 latents"):
        label_latents(sp.csr_matrix(x), sp.csr_matrix(codes), virtual[:4], LogicConfig())


def test_virtual_table_keeps_each_latents_strongest_weights_by_input_spread() -> None:
    # input 0 has the largest weight but never varies; input 2 a small weight and a wide spread
    x = sp.csr_matrix(np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 10.0], [1.0, 0.0, 0.0]]))
    virtual = np.array([[5.0, 1.0], [1.0, -2.0], [0.5, 0.0]])
    table = virtual_table(virtual, x, per_output=2)
    kept = {(o, i): w for o, i, w in table.iter_rows()}
    assert kept == {(0, 1): 1.0, (0, 2): 0.5, (1, 0): 1.0, (1, 1): -2.0}


def test_latent_codes_are_the_transcoders_codes_row_for_row_with_the_store(
    tmp_path: Path,
) -> None:
    models = _sheet_models()
    lm, tc = models.lm, models.tc
    tokens = _tokens(lm, n=5, seq=10)
    digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    contexts = Contexts(tokens, torch.zeros_like(tokens, dtype=torch.int32), "t", digest, 1)
    site = Site("mlp_resid", 1)
    collect_codes(lm, contexts, {site: models.sae_in}, tmp_path, CollectConfig(forward_batch=2))
    store = CodeStore.open(tmp_path)
    got = latent_codes(lm, tc, 1, tokens, store, batch_size=2)
    x = capture(lm, tokens, [Site("mlp_in", 1)])[Site("mlp_in", 1)][:, 1:]
    expected = tc.encode(x.reshape(-1, lm.adapter.d_model)).numpy()
    assert got.shape == (store.n_tokens, tc.width) == expected.shape
    np.testing.assert_allclose(got.toarray(), expected, atol=1e-5)
    with pytest.raises(CoactError, match="not these contexts"):
        latent_codes(lm, tc, 1, tokens.flip(0), store)


def _row(route: str, fvu: float, ce: float) -> SheetRow:
    return SheetRow(
        route=route, fvu=fvu, l0=4.0, dead_fraction=0.25, delta_ce=0.5, kl=0.25,
        ce_recovered=ce, connections_per_output=3.0, jacobian_sign=0.75, jacobian_size=0.5,
        jacobian_spearman=0.9, ablation_sign=1.0, ablation_size=0.5, ablation_spearman=0.5,
        linear_share=0.125,
    )  # fmt: skip


def test_the_sheet_round_trips_and_the_layer_page_says_which_route_wins() -> None:
    rows = {
        "transcoder": _row("transcoder", 0.2, 0.9),
        "sae_linear": _row("sae_linear", 0.5, 0.6),
        "sae_mlp": _row("sae_mlp", 0.4, 0.7),
        "sae_out": _row("sae_out", 0.1, 0.95),
    }
    result = TranscoderResult(
        key="k", layer=1, directory="d", transcoder="t", width=64, k=4, skip=True,
        train_tokens=1000, trained_now=True, train_seconds=3.0, tokens=100, slope_tokens=50,
        connections_judged=10, ablations_judged=5, rows=rows, labels_sae={"AND": 2, "OR": 1},
        timings={"train_s": 3.0}, labels_transcoder={"AND": 1, "OR": 3},
        coverage_sae=_coverage(0.25), coverage_transcoder=_coverage(0.5),
    )  # fmt: skip
    assert TranscoderResult.from_dict(result.to_dict()) == result
    frame = {r["route"]: r for r in _sheet_frame(result).iter_rows(named=True)}
    assert (frame["transcoder"]["labels_OR"], frame["transcoder"]["labels_explained"]) == (3, 0.5)
    assert (frame["sae_mlp"]["labels_AND"], frame["sae_mlp"]["labels_explained"]) == (2, 0.25)
    page = "\n".join(
        transcoder_section(SimpleNamespace(summary=SimpleNamespace(transcoder=result)))
    )
    assert (
        "| skip transcoder | 0.2 | 4.0 | 25.0% | 0.5 | 0.25 | 90.0% | 3.0 | 75% / 50% / 0.90 |"
        in page
    )
    assert "the transcoder explains the MLP output better: FVU 0.200" in page
    assert "At the same k (4; active latents per token 4.0 for the transcoder, 4.0 for" in page
    assert "against 0.400 for the SAE route (SAE route, mlp connector)" in page
    assert "| AND | 2 | 1 |" in page and "| OR | 1 | 3 |" in page
    assert "| explained (alive, ≥ coverage target) | 25.0% | 50.0% |" in page
    worse = dataclasses.replace(result, rows={**rows, "transcoder": _row("transcoder", 0.6, 0.5)})
    assert "the SAE route explains" in verdict(worse)
    assert transcoder_section(SimpleNamespace(summary=None)) == []
    # a model run's layers.parquet gains the sheet's headline columns
    assert layer_columns(result) == {
        "transcoder_fvu": 0.2, "transcoder_ce_recovered": 0.9, "sae_linear_fvu": 0.5,
        "sae_linear_ce_recovered": 0.6, "sae_mlp_fvu": 0.4, "sae_mlp_ce_recovered": 0.7,
        "transcoder_labels_explained": 0.5, "sae_labels_explained": 0.25,
    }  # fmt: skip
    assert layer_columns(None) == {}
    line = format_transcoder(result)
    assert (
        "skip transcoder FVU 0.200, CE recovered 90.0%; SAE route, linear connector FVU 0.500"
        in line
    )
    assert "labels, SAE route: AND 2, OR 1; transcoder: AND 1, OR 3" in line
    unlabelled = dataclasses.replace(result, labels_sae=None, labels_transcoder=None)
    assert "the logic stage did not run" in "\n".join(label_table(unlabelled))


def _coverage(share: float) -> CoverageSummary:
    return CoverageSummary(
        coverage_target=0.8, min_lift=2.0, max_inputs=4, coverage_search=64, alive=4,
        explained=int(4 * share), share_explained=share, median_coverage=0.7, median_auc=0.9,
        median_jacobian_share=None, reached=3, inputs_needed={"median": 2.0},
        inputs_needed_histogram={"1": 1, "2": 2, "not reached": 1},
    )  # fmt: skip


def test_the_stage_is_opt_in_and_reads_the_connectors() -> None:
    from coact.errors import CoactError
    from coact.pipeline.config import DEFAULT_STAGES, AnalyzeConfig
    from coact.pipeline.stages import stages_of

    assert "transcoder" not in DEFAULT_STAGES
    config = AnalyzeConfig().with_stages(add=("transcoder",))
    assert [s.name for s in stages_of(config)][-1] == "transcoder"
    with pytest.raises(CoactError, match="stage transcoder reads the results of connect"):
        stages_of(AnalyzeConfig(stages=("transcoder",)))
