"""End to end: `coact analyze` on a tiny model and on the real SmolLM2; bad input via the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from coact.calibrate.stage import CalibrateConfig
from coact.codes.collect import CollectConfig
from coact.codes.store import CodeStore
from coact.connectors.config import MLP_FIT, ConnectConfig
from coact.connectors.exact import LassoPathConfig
from coact.errors import CoactError
from coact.linearity.table import LinearityConfig, relabel
from coact.pipeline import run as pipeline
from coact.pipeline.budgets import with_budget
from coact.pipeline.config import BLOCK_STAGES, AnalyzeConfig, parse_layers
from coact.pipeline.run import analyze
from coact.rundir.layout import RunLayout
from coact.sae.train import SaeTrainConfig

SMALL_SAE = SaeTrainConfig(k=8, buffer_contexts=16, batch_tokens=128)


def _config(tmp_path: Path, **overrides: object) -> AnalyzeConfig:
    base: dict[str, object] = {
        "model": "tiny-llama",
        "layer": 1,
        "tokens": 2_000,
        "sae_tokens": 3_000,
        "eval_contexts": 4,
        "ctx_len": 32,
        "run_dir": str(tmp_path / "run"),
        "sae": SMALL_SAE,
        "collect": CollectConfig(forward_batch=8, shard_contexts=16),
        # tests/test_report.py builds reports
        "stages": ("connect", "calibrate", "logic", "outliers"),
    }
    base.update(overrides)
    return AnalyzeConfig(**base)  # type: ignore[arg-type]


def test_analyze_tiny_writes_summary_codes_and_saes(tmp_path: Path) -> None:
    summary = analyze(_config(tmp_path))
    assert summary.saes_trained_now == ["mlp_resid[1]", "mlp_out[1]"]
    assert sorted(summary.saes_evaluated_now) == ["mlp_out[1]", "mlp_resid[1]"]
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["tokens"] == summary.tokens >= 2_000
    for site in ("mlp_resid[1]", "mlp_out[1]"):
        s = on_disk["sites"][site]
        assert 0 < s["fve"] <= 1 and 0 < s["l0"] <= 8 and 0 <= s["dead_fraction"] <= 1
        assert s["ce_clean"] > 0 and s["n_tokens"] == 4 * 31
        assert (run / "sae" / site.replace("[", ".").rstrip("]") / "cfg.json").is_file()
    store = CodeStore.open(run / "codes")
    store.verify()
    assert store.read_site("mlp_out.1").shape == (summary.tokens, 4 * 64)
    tokens = store.read_tokens()
    assert tokens.height == summary.tokens and tokens["position"].min() == 1
    connected = on_disk["connect"]
    share = connected["share"]
    assert share["alive"] + share["dead"] == 4 * 64
    assert share["linear"] + share["nonlinear"] == share["alive"]
    for name in ("sweep", "weights", "features", "top_tokens", "mlp_curve"):
        assert (run / "connect" / f"{name}.parquet").is_file()
    # The CLI stage on the same run reuses the finished result and prints the headline.
    again = _cli("connect", str(run))
    assert again.returncode == 0, again.stderr
    assert f"chosen α {connected['alpha']:.3g}" in again.stdout
    assert "linear share:" in again.stdout


def test_analyze_resumes_and_reuses_saes(tmp_path: Path) -> None:
    first = analyze(_config(tmp_path))
    run = tmp_path / "run"
    weights = run / "sae" / "mlp_out.1" / "sae_weights.safetensors"
    first_sae = weights.read_bytes()
    shard = sorted((run / "codes" / "mlp_out.1").glob("shard-*.safetensors"))[-1]
    first_codes = shard.read_bytes()
    manifest = json.loads((run / "codes" / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:-1]  # as if killed before the last shard landed
    (run / "codes" / "manifest.json").write_text(json.dumps(manifest))
    shard.unlink()
    summary = analyze(_config(tmp_path))
    assert summary.saes_trained_now == []  # reused, not retrained
    assert summary.saes_evaluated_now == []  # same SAEs, same tokens: reports reused
    assert summary.sites == first.sites
    assert weights.read_bytes() == first_sae
    assert shard.read_bytes() == first_codes


SMALL_CONNECT = ConnectConfig(path=LassoPathConfig(n_alphas=6), stability=False, progress=False,
                              mlp=replace(MLP_FIT, hidden=32, epochs=1))  # fmt: skip
SMALL_CALIBRATE = CalibrateConfig(
    contexts=4, strengths=(0.0, 0.3), n_taus=2, n_boot=50, causal_connections=0, progress=False
)
BLOCK_RUN = ("connect", "calibrate", *BLOCK_STAGES)  # the block's stages, no logic or outliers


def test_parse_layers() -> None:
    assert parse_layers("all") == "all"
    assert parse_layers("3") == (3,)
    assert parse_layers("0-2, 5,1") == (0, 1, 2, 5)
    for bad in ("x", "1-", ",", "2-a"):
        with pytest.raises(CoactError, match="layers"):
            parse_layers(bad)


def test_survey_budget_cuts_every_costly_setting_and_full_keeps_the_config() -> None:
    base = AnalyzeConfig(layers="all")
    assert with_budget(base, "full") == base
    survey = with_budget(base, "survey")
    assert (survey.tokens, survey.sae_tokens) == (40_000, 120_000)
    assert survey.sae.batch_tokens == 512 and survey.sae_tokens // 512 >= 200  # still ≥ 200 steps
    assert survey.sae.dead_after_tokens < survey.sae_tokens
    assert survey.eval_contexts < base.eval_contexts
    assert survey.calibrate.contexts < base.calibrate.contexts
    assert len(survey.calibrate.strengths) < len(base.calibrate.strengths)
    assert 0.0 in survey.calibrate.strengths  # the clean point stays on every curve
    path = survey.block.composition.path
    assert path.n_alphas < 20 and path.alpha_min_ratio > 0.01
    assert not survey.logic.sae_connector and survey.report_features == 10
    assert not survey.connect.stability
    assert survey.sae_group > base.sae_group  # fewer forward passes over the training tokens
    assert survey.calibrate.noise_kinds == ("isotropic",)
    ablation, full_ablation = survey.ablation, base.ablation
    assert ablation.contexts < full_ablation.contexts
    assert ablation.inputs_per_feature < full_ablation.inputs_per_feature
    block, full_block = survey.block, base.block
    assert block.causal.contexts < full_block.causal.contexts
    assert block.causal.resample.targets < full_block.causal.resample.targets
    assert 1 < len(block.positions.ridge) < len(full_block.positions.ridge)  # λ still chosen
    assert survey.layers == "all" and survey.sae.k == base.sae.k  # what is studied is unchanged
    with pytest.raises(CoactError, match="unknown budget"):
        with_budget(base, "tiny")


def test_block_single_layer_writes_attention_positions_and_composition(tmp_path: Path) -> None:
    summary = analyze(
        _config(
            tmp_path, stages=BLOCK_RUN, connect=SMALL_CONNECT, calibrate=SMALL_CALIBRATE,
        )
    )  # fmt: skip
    run = tmp_path / "run"
    assert set(summary.sites) == {
        "mlp_resid[1]", "mlp_out[1]", "resid_pre[1]", "attn_out[1]", "resid_pre[2]"
    }  # fmt: skip
    block = summary.block
    # attention has its own τ, calibrated at attn_out as the MLP's is at mlp_out
    assert block.mlp_tau == summary.calibrate.tau
    attention_calibration = json.loads((run / "attention/calibrate/calibrate.json").read_text())
    assert block.tau == attention_calibration["tau"] == block.attention_calibration.tau
    assert set(attention_calibration["splices"]) == {"sae", "linear", "mlp", "zero"}
    attention, scored, at_tau = block.attention, block.positions, block.attention_share
    assert (attention.in_site, attention.out_site) == ("resid_pre[1]", "attn_out[1]")
    assert block.tau == scored.tau  # the share at attention's τ is block.attention_share
    # the connectors are fitted at the connect stage's τ and relabelled at attention's own
    fitted = json.loads((run / "attention" / "connect" / "connect.json").read_text())
    assert fitted["tau"] == SMALL_CONNECT.linearity.tau
    relabelled = relabel(
        pl.read_parquet(run / "attention" / "connect" / "features.parquet"),
        LinearityConfig(tau=block.tau, form=block.form),
    )
    assert at_tau.linear == (relabelled["status"] == "linear").sum()
    # the causal checks beside the predictive score, one row per attention feature
    causal = block.attention_causal
    table = pl.read_parquet(run / "attention" / "causal" / "causal.parquet")
    assert table.height == at_tau.alive + at_tau.dead
    assert {"self_only_fvu", "resample_fvu", "position_status", "gain_fvu"} <= set(table.columns)
    counted = sum(causal.agreement.values())
    alive_both = table.filter(
        pl.col("position_status").is_in(["same_position", "needs_context"])
        & pl.col("resample_fvu").is_finite()
    )
    assert counted == alive_both.height > 0
    assert 0 <= causal.resample.percent_context_free <= 100
    assert at_tau.linear + at_tau.nonlinear == at_tau.alive
    assert 0 <= scored.share.percent_same_position <= 100
    # the same held-out split: where validation chose no ridge, the same-position fit is
    # connect's least squares
    assert scored.tokens_heldout == attention.tokens_heldout
    lin = pl.read_parquet(run / "attention" / "connect" / "features.parquet").sort("feature")
    pos = pl.read_parquet(run / "attention" / "positions" / "positions.parquet").sort("feature")
    unridged = ((lin["status"] != "dead") & (pos["ridge_same"] == 0)).to_numpy()
    assert np.allclose(
        lin["mse_linear"].to_numpy()[unridged], pos["mse_same"].to_numpy()[unridged], rtol=1e-6
    )
    composed = block.composition
    assert composed.sources == ["resid_pre[1]", "attn_out[1]", "mlp_out[1]"]
    assert composed.target == "resid_pre[2]"
    # the model's own identity resid_pre[2] = resid_pre[1] + attn_out[1] + mlp_out[1]
    assert block.decoded_fvu["identity_raw"] < 1e-8
    assert 0 < block.decoded_fvu["identity_decoded"] < 1
    assert json.loads((run / "block.json").read_text())["composition"]["target"] == "resid_pre[2]"
    # attention's own Jacobian at the same position, in the MLP jacobian stage's tables
    jac = block.attention_jacobian
    assert (jac.in_site, jac.out_site, jac.directory) == (
        "resid_pre[1]", "attn_out[1]", str(run / "attention" / "jacobian")
    )  # fmt: skip
    assert jac.agreement is None and jac.connections > 0
    jac_features = pl.read_parquet(run / "attention" / "jacobian" / "features.parquet")
    assert jac_features.height == summary.sites["attn_out[1]"].width
    # `coact graph`: the next stream's most strongly fed feature, walked back two hops
    composition = pl.read_parquet(run / "composition" / "composition_weights.parquet")
    target = int(composition.sort(pl.col("weight").abs(), descending=True)["out_feature"][0])
    shown = _cli("graph", str(run), "resid_pre[2]", str(target), "--top", "2")
    assert shown.returncode == 0, shown.stderr
    edges = pl.read_parquet(run / "graph" / f"graph_resid_pre.2_{target}_edges.parquet")
    nodes = pl.read_parquet(run / "graph" / f"graph_resid_pre.2_{target}_nodes.parquet")
    assert edges.height > 0 and nodes.filter(pl.col("chosen"))["feature"].to_list() == [target]
    assert (edges["target_site"] == "resid_pre[2]").any() and set(edges["depth"]) <= {1, 2}
    assert edges.group_by("depth", "target_site", "target_feature").len()["len"].max() <= 2
    printed = [line for line in shown.stdout.splitlines() if " → " in line]
    assert len(printed) == edges.height
    assert {"graph_resid_pre.2_" + f"{target}.png", f"graph_resid_pre.2_{target}_edges.csv"} <= {
        p.name for p in (run / "graph").iterdir()
    }
    wrong = _cli("graph", str(run), "mlp_out[7]", "0")
    assert wrong.returncode == 2 and wrong.stderr.strip().count("\n") == 0
    assert "not a site of block 1" in wrong.stderr


def test_model_run_shares_saes_and_codes_across_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(
        tmp_path, model="tiny-gpt-neox", layers=(0, 1), connect=SMALL_CONNECT,
        calibrate=SMALL_CALIBRATE, stages=BLOCK_RUN,
    )  # fmt: skip
    summary = analyze(config)
    model = tmp_path / "run"
    assert summary.layers == [0, 1]
    # parallel residual: mlp_resid[ℓ] is resid_pre[ℓ], so one SAE serves both names, and
    # resid_pre[1] (layer 0's next stream, layer 1's input) is trained once
    assert sorted(summary.saes_trained_now) == sorted(
        ["resid_pre[0]", "attn_out[0]", "mlp_out[0]", "resid_pre[1]", "attn_out[1]",
         "mlp_out[1]", "resid_pre[2]"]
    )  # fmt: skip
    assert not (model / "sae" / "mlp_resid.0").exists()
    store = CodeStore.open(model / "codes")
    assert {"mlp_resid.0", "resid_pre.0", "resid_pre.2", "attn_out.1"} <= set(store.sites)
    assert np.array_equal(
        store.read_site("mlp_resid.1").toarray(), store.read_site("resid_pre.1").toarray()
    )
    table = pl.read_parquet(model / "layers.parquet")
    assert table["layer"].to_list() == [0, 1]
    for column in (
        "mlp_percent_linear", "attention_percent_linear", "attention_percent_same_position",
        "composition_r2_sparse", "composition_share_resid_pre", "composition_share_attn_out",
        "composition_share_mlp_out", "decoded_fvu_identity_raw", "mlp_percent_linear_seed_tau",
        "attention_percent_linear_seed_tau", "attention_percent_same_position_seed_tau",
        "mlp_nmse_linear", "mlp_nmse_mlp", "mlp_percent_mlp_gain", "attention_nmse_linear",
        "attention_nmse_mlp", "attention_percent_mlp_gain", "attention_nmse_same_position",
        "attention_nmse_with_context",
    ):  # fmt: skip
        assert table[column].null_count() == 0, column
    # the fit-quality columns are each layer's own connect and positions headlines
    for row in table.iter_rows(named=True):
        fitted = json.loads((model / f"L{row['layer']}" / "connect/connect.json").read_text())
        assert row["mlp_nmse_linear"] == fitted["heldout_nmse_linear"]
        assert row["mlp_percent_mlp_gain"] == pytest.approx(
            100 * fitted["share"]["mlp_gain_beyond_noise"] / fitted["share"]["alive"]
        )
        scored = json.loads(
            (model / f"L{row['layer']}" / "attention/positions/positions.json").read_text()
        )
        assert row["attention_nmse_with_context"] == scored["heldout_nmse_context"]
    assert (table["decoded_fvu_identity_raw"] < 1e-8).all()
    for layer in (0, 1):
        run = model / f"L{layer}"
        assert RunLayout.of(run).codes == run / ".." / "codes"
        layer_summary = json.loads((run / "summary.json").read_text())
        assert layer_summary["codes"]["directory"] == str(model / "codes")
        assert (run / "composition" / "decoded.parquet").is_file()
    # a stage command on a layer of the model run finds the shared codes
    again = _cli("connect", str(model / "L1"))
    assert again.returncode == 0, again.stderr
    # and the whole run resumes without training or collecting anything again, nor
    # rerunning a finished layer; a layer without its summary.json is the only one rerun
    rerun: list[int] = []
    layer_stages = pipeline.run_layer

    def recorded(layer_config: AnalyzeConfig, *args: Any, **kwargs: Any) -> Any:
        rerun.append(layer_config.layer)
        return layer_stages(layer_config, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run_layer", recorded)
    resumed = analyze(config)
    assert resumed.saes_trained_now == [] and rerun == []
    assert resumed.layers_finished_before == [0, 1]
    assert pl.read_parquet(model / "layers.parquet").equals(table)
    (model / "L1" / "summary.json").unlink()
    assert analyze(config).layers_finished_before == [0] and rerun == [1]
    assert pl.read_parquet(model / "layers.parquet").equals(table)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coact", *args], capture_output=True, text=True, timeout=300
    )


# Bad input to `coact analyze` (unknown model, layer out of range, missing or empty corpus,
# unknown budget, an SAE of the wrong width) is checked in-process, with the run directory
# left untouched, by tests/test_bad_input.py.


@pytest.mark.slow
def test_analyze_real_smollm2_few_thousand_tokens(tmp_path: Path) -> None:
    """The real embedded model end to end: SAEs must beat chance clearly even when tiny."""
    config = _config(
        tmp_path,
        model="smollm2-135m",
        layer=2,
        tokens=3_000,
        sae_tokens=12_000,
        eval_contexts=8,
        ctx_len=64,
        sae=SaeTrainConfig(k=32, buffer_contexts=64, batch_tokens=256),
        # 2,304 features from ~2,700 tokens is underdetermined: keep the path short.
        connect=ConnectConfig(
            path=LassoPathConfig(n_alphas=4, alpha_min_ratio=0.3),
            stability=False,
            mlp=replace(MLP_FIT, hidden=64, epochs=1),
        ),
        # Every calibration splice is a full forward pass of the real model: keep few.
        calibrate=CalibrateConfig(
            contexts=2, strengths=(0.0, 0.3), n_taus=1, n_boot=100, causal_connections=5
        ),
    )  # fmt: skip
    summary = analyze(config)
    calibrated = summary.calibrate
    assert calibrated.n_contexts == 2 and calibrated.splices["zero"].ce_recovered == 0
    assert 0 <= calibrated.linear_calibrated.percent_linear <= 100
    resid = summary.sites["mlp_resid[2]"]
    assert resid.fve > 0.5, resid
    assert resid.ce_clean < resid.ce_spliced < resid.ce_ablated
    assert 0.0 < resid.ce_recovered <= 1.0
    assert summary.tokens >= 3_000
    assert CodeStore.open(tmp_path / "run" / "codes").read_site("mlp_resid.2").nnz > 0
    connected = summary.connect.share
    assert connected.alive + connected.dead == 2304 and connected.alive > 0
    assert 0 <= connected.percent_linear <= 100
