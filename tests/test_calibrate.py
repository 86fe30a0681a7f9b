"""Calibration of τ: the threshold rule by hand, and on planted models end to end."""

from __future__ import annotations

import json

import numpy as np

from coact.calibrate.stage import candidate_taus, pick_tau
from coact.linearity.table import SEED_TAU


def test_candidate_taus_span_all_mlp_to_all_linear() -> None:
    d = np.array([0.004, 0.0, 0.002, 0.01, np.nan])
    taus = candidate_taus(d, n_taus=2)
    # One under every d, the quantiles 0, ½, 1 (0, 0.003, 0.01) and the seed's 0.001.
    assert taus[0] < 0.0 and (d[np.isfinite(d)] > taus[0]).all()
    np.testing.assert_allclose(taus[1:], [0.0, SEED_TAU, 0.003, 0.01])
    assert (np.diff(taus) > 0).all()


def test_pick_tau_is_the_largest_with_every_smaller_one_within_tolerance() -> None:
    taus = np.array([-1.0, 0.0, 0.001, 0.003, 0.01])
    extra = np.array([0.0, 0.002, 0.004, 0.02, 0.005])  # 0.003 breaks it; 0.01 is not reached
    assert pick_tau(taus, extra, tolerance=0.005) == 0.001
    assert pick_tau(taus[::-1], extra[::-1], tolerance=0.005) == 0.001  # order-free
    assert pick_tau(taus, extra, tolerance=0.1) == 0.01
    assert pick_tau(taus, np.full(5, 0.5), tolerance=0.1) == -1.0  # nothing passes: all mlp


def _calibrated(kind: str, tmp_path, attention: bool = False, **settings):
    """Planted model → codes → connectors → calibration, all at test size; with
    `attention`, the plant is a block's attention and calibration runs at attn_out."""
    summary, out, _, _ = calibrated_plant(kind, tmp_path, attention, **settings)
    return summary, out


def calibrated_plant(kind: str, tmp_path, attention: bool = False, **settings):
    """`_calibrated`, also handing back the plant and the held-out contexts it was given."""
    from dataclasses import replace

    import torch

    from coact.calibrate.stage import CalibrateConfig, calibrate
    from coact.codes.collect import CollectConfig, collect_codes
    from coact.codes.corpus import Contexts
    from coact.connectors.config import MLP_FIT, ConnectConfig
    from coact.connectors.exact import LassoPathConfig
    from coact.connectors.stage import connect
    from coact.models.sites import SitePair
    from coact.pipeline.shared import calibration_tokens
    from tests.planted_model import planted_attention, planted_model, random_tokens

    plant = (planted_attention if attention else planted_model)(kind)  # type: ignore[operator]
    tokens = random_tokens(96, 24, seed=1)
    contexts = Contexts(tokens, torch.zeros_like(tokens, dtype=torch.int32), "planted", kind, 96)
    site_in, site_out = plant.sites
    store = collect_codes(
        plant.lm, contexts, {site_in: plant.sae_in, site_out: plant.sae_out}, tmp_path / "codes",
        CollectConfig(forward_batch=16, shard_contexts=32),
    )  # fmt: skip
    linking = ConnectConfig(
        heldout_fraction=0.25, path=LassoPathConfig(n_alphas=6), progress=False,
        mlp=replace(MLP_FIT, hidden=32, epochs=30, lr=1e-2, batch_tokens=128),
    )  # fmt: skip
    pair = SitePair(site_in, site_out)
    connect(store, pair, tmp_path / "connect", linking)
    held = calibration_tokens(contexts, store, linking)
    config = replace(
        CalibrateConfig(contexts=24, strengths=(0.0, 0.3, 3.0), n_boot=200, progress=False),
        **settings,
    )
    out = tmp_path / "calibrate"
    summary = calibrate(
        plant.lm, pair, plant.sae_in, plant.sae_out, held, tmp_path / "connect", out, config
    )
    return summary, out, plant, held


def test_linear_plant_splices_back_the_clean_model_and_is_all_linear(tmp_path) -> None:
    import polars as pl

    summary, out = _calibrated("linear", tmp_path)
    splices = {
        r["splice"]: r for r in pl.read_parquet(out / "splices.parquet").iter_rows(named=True)
    }
    # The output SAE is exact on the plant: splicing its reconstruction is the clean pass.
    assert abs(splices["sae"]["delta_ce"]) < 1e-5 and splices["sae"]["kl"] < 1e-6
    # Least squares recovers B exactly, so the decoded prediction is the MLP's own output.
    assert abs(splices["linear"]["delta_ce"]) < 1e-4 and splices["linear"]["kl"] < 1e-5
    assert splices["zero"]["ce_recovered"] == 0.0 and splices["linear"]["ce_recovered"] > 0.99
    # Every candidate τ stays within ε, so τ is the largest: every alive feature is linear.
    assert summary.linear_calibrated.percent_linear == 100.0
    taus = pl.read_parquet(out / "splices.parquet")["tau"].drop_nulls()
    assert summary.tau == taus.max()
    noise = pl.read_parquet(out / "noise.parquet").filter(pl.col("strength") == 0.0)
    assert noise.height == 2 and (noise["delta_ce"] == 0.0).all()
    causal = summary.causal
    assert causal is not None and causal.judged > 0 and causal.share_both_agree == 1.0
    assert summary.n_tokens == 24 * 22 and (out / "calibrate.json").is_file()
    # the report draws the stage's curves from its tables
    for drawn in _charts(summary, out, tmp_path).values():
        spec = json.loads(drawn[0].read_text())
        assert "tokens" in spec["title"]["subtitle"]  # every figure states what it rests on
        assert drawn[1].stat().st_size > 10_000


def test_attention_plant_is_calibrated_at_attn_out(tmp_path) -> None:
    """A same-position linear attention plant: the splices replace attn_out (zeroing it
    costs loss, splicing least squares' prediction back costs none), so every feature is
    linear at the calibrated τ; the MLP-only causal check is not run."""
    import polars as pl

    summary, out = _calibrated("current", tmp_path, attention=True)
    splices = {
        r["splice"]: r for r in pl.read_parquet(out / "splices.parquet").iter_rows(named=True)
    }
    assert abs(splices["sae"]["delta_ce"]) < 1e-5 and splices["sae"]["kl"] < 1e-6
    assert abs(splices["linear"]["delta_ce"]) < 1e-4 and splices["linear"]["kl"] < 1e-5
    assert splices["zero"]["kl"] > 1e-4  # zeroing the planted attention changes the model
    assert summary.linear_calibrated.percent_linear == 100.0
    assert summary.causal is None and not (out / "causal.parquet").exists()
    spec = json.loads(_charts(summary, out, tmp_path)["noise"][0].read_text())
    assert "attn_out[1]" in json.dumps(spec)  # the curves name the site they were taken at


def _charts(summary, out, tmp_path):
    """The report's noise and threshold charts of a calibration, drawn from its tables."""
    import polars as pl

    from coact.report.charts import calibrate as calibrate_charts
    from coact.report.charts.base import save

    noise, splices = (
        pl.read_parquet(out / "noise.parquet"),
        pl.read_parquet(out / "splices.parquet"),
    )
    return {
        "noise": save(calibrate_charts.noise_curves(noise, summary.out_site), tmp_path / "noise"),
        "threshold": save(
            calibrate_charts.threshold_curve(splices, summary.tau, summary.tolerance),
            tmp_path / "threshold",
        ),
    }
