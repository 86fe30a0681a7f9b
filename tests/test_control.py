"""The control run: the uninformative rule on hand-made numbers, the control's config, and
`analyze --control` end to end on a tiny model (an ordinary run directory in <run>/control/,
its figures in summary.json, read back on the next run instead of rerun)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from coact.calibrate.causal import CausalSummary
from coact.codes.store import CodeStore
from coact.jacobian.agreement import Agreement
from coact.jacobian.stage import JacobianResult
from coact.linearity.table import LinearityConfig, LinearShare, relabel
from coact.logic.stage import LabelsConfig, LogicResult
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.control import control_config
from coact.pipeline.control_figures import (
    NMSE_TOLERANCE,
    causal_figures,
    jacobian_figures,
    judge,
    label_figures,
    share_figure,
    spearman_interval,
    wilson,
)
from coact.pipeline.run import analyze
from coact.pipeline.summary import RunSummary
from coact.report.control_section import UNINFORMATIVE, control_section, format_control
from coact.report.text import format_summary
from coact.rundir.layout import RunLayout
from coact.rundir.read import load_run
from tests.tiny_run import tiny_config


def test_wilson_interval_matches_the_formula_by_hand() -> None:
    # 5 of 10, z = 1.96: centre (0.5 + 0.19208) / 1.38416 = 0.5, half-width
    # 1.96·sqrt(0.025 + 0.0009604) / 1.38416 = 0.26340 → 0.23660 .. 0.76340
    low, high = wilson(5, 10)
    assert low == pytest.approx(0.23659, abs=1e-4) and high == pytest.approx(0.76341, abs=1e-4)
    # 0 of 20: [0, z² / (n + z²)] = [0, 3.8415 / 23.8415]
    assert wilson(0, 20) == pytest.approx((0.0, 3.8415 / 23.8415), abs=1e-4)
    assert all(math.isnan(v) for v in wilson(0, 0))
    # all successes: the upper bound is exactly 1, so 100 % beside 100 % is uninformative
    for n in range(1, 60):
        assert wilson(n, n)[1] == 1.0 and wilson(0, n)[0] == 0.0
    assert not judge(100.0, 100.0, low=100 * wilson(7, 7)[0], high=100 * wilson(7, 7)[1])


def test_judge_marks_values_inside_the_interval_or_tolerance_uninformative() -> None:
    assert judge(30.0, 25.0, low=10.0, high=70.0) is False  # inside: uninformative
    assert judge(80.0, 25.0, low=10.0, high=70.0) is True
    assert judge(10.0, 25.0, low=10.0, high=70.0) is False  # the bounds belong to it
    # no interval: 5 % of the larger magnitude
    assert judge(0.48, 0.50) is False  # |0.02| ≤ 0.025
    assert judge(0.40, 0.50) is True  # |0.10| > 0.025
    assert judge(0.50, 0.50 * (1 - NMSE_TOLERANCE) - 1e-9) is True


def _share(
    linear: int, alive: int, sure: int | None = None, unsure: int | None = None
) -> LinearShare:
    bracket = {}
    if sure is not None and unsure is not None:
        bracket = {
            "confident_linear": sure,
            "undecided": unsure,
            "percent_linear_confident": 100 * sure / alive,
            "percent_linear_possible": 100 * (sure + unsure) / alive,
        }
    return LinearShare(
        percent_linear=100 * linear / alive, linear=linear, nonlinear=alive - linear, dead=0,
        alive=alive, **bracket,
    )  # fmt: skip


def test_share_figure_uses_the_controls_noise_floor_bracket_else_wilson() -> None:
    control = _share(50, 200, sure=20, unsure=100)  # bracket 10 % .. 60 %
    inside = share_figure("x", _share(54, 200), control)
    assert (inside.control_low, inside.control_high) == (10.0, 60.0)
    assert inside.value == 27.0 and inside.control == 25.0 and not inside.informative
    outside = share_figure("x", _share(150, 200), control)  # 75 % > 60 %
    assert outside.informative
    no_floor = share_figure("x", _share(150, 200), _share(50, 200))
    low, high = wilson(50, 200)
    assert no_floor.control_low == pytest.approx(100 * low)
    assert no_floor.control_high == pytest.approx(100 * high)
    assert no_floor.informative


def _logic(counts: dict[str, int]) -> LogicResult:
    return LogicResult(
        key="k", in_site="a", out_site="b", directory="d", tokens=1, counts=counts,
        hidden_counts=None, most_confident={}, config=LabelsConfig(), timings={},
    )  # fmt: skip


def test_label_shares_are_judged_against_the_controls_wilson_interval() -> None:
    real = _logic({"AND": 100, "OR": 0, "UNEXPLAINED": 100, "DEAD": 56})
    control = _logic({"AND": 2, "OR": 0, "UNEXPLAINED": 198, "DEAD": 0})
    figures = label_figures(real, control)
    assert set(figures) == {"labels_AND", "labels_OR", "labels_UNEXPLAINED"}
    a = figures["labels_AND"]
    assert a.value == 50.0 and a.control == 1.0  # of 200 alive each; DEAD aside
    assert a.informative
    assert a.control_high == pytest.approx(100 * wilson(2, 200)[1])
    assert not figures["labels_OR"].informative  # 0 % beside 0 %


def test_causal_shares_become_percents_judged_by_wilson() -> None:
    real = CausalSummary(
        connections=50, judged=34, share_sign_agrees=28 / 34, share_size_agrees=6 / 34,
        share_both_agree=6 / 34,
    )  # fmt: skip
    control = CausalSummary(
        connections=50, judged=20, share_sign_agrees=0.5, share_size_agrees=0.2,
        share_both_agree=0.1,
    )  # fmt: skip
    figures = causal_figures(real, control)
    sign = figures["causal_sign"]
    assert sign.value == pytest.approx(100 * 28 / 34) and sign.control == 50.0
    assert sign.control_high == pytest.approx(100 * wilson(10, 20)[1])
    assert sign.informative  # 82 % > 72.0 %
    assert not figures["causal_size"].informative  # 17.6 % inside 8.1 .. 41.6 %
    nobody = CausalSummary(
        connections=5, judged=0, share_sign_agrees=math.nan, share_size_agrees=math.nan,
        share_both_agree=math.nan,
    )  # fmt: skip
    assert causal_figures(real, nobody) == {}


def test_spearman_interval_by_hand() -> None:
    # ρ = 0.5 over 28 pairs: atanh 0.54931 ± 1.96·sqrt(1.06 / 25) = ± 0.40359
    low, high = spearman_interval(0.5, 28)
    assert low == pytest.approx(math.tanh(0.54931 - 0.40359), abs=1e-4)
    assert high == pytest.approx(math.tanh(0.54931 + 0.40359), abs=1e-4)
    assert low == pytest.approx(0.1447, abs=1e-3) and high == pytest.approx(0.7412, abs=1e-3)
    assert all(math.isnan(v) for v in spearman_interval(0.5, 3))
    assert all(math.isnan(v) for v in spearman_interval(1.0, 30))


def _agreement(judged: int, share: float, rho: float) -> Agreement:
    shares = dict.fromkeys(
        ("connector_sign", "connector_size", "jacobian_sign", "jacobian_size",
         "weight_jacobian_sign", "weight_jacobian_size", "first_order_size", "threshold_size",
         "map_matches_ablation"), share,
    )  # fmt: skip
    ranks = dict.fromkeys(
        ("connector_spearman", "jacobian_spearman", "weight_jacobian_spearman"), rho
    )
    return Agreement(judged=judged, **shares, **ranks)


def _jacobian(linear: float, median: float, agreement: Agreement | None) -> JacobianResult:
    return JacobianResult(
        key="k", in_site="a", out_site="b", directory="d", tokens=1, contexts=1, connections=1,
        features_scored=200, max_nonlinearity=0.1, share_linear=linear,
        share_nonlinear=1 - linear, share_uncertain=0.0, median_nonlinearity=median,
        agreement=agreement,
    )  # fmt: skip


def test_jacobian_score_and_agreement_beside_the_control() -> None:
    real = _jacobian(0.9, 0.05, _agreement(28, 0.9, 0.8))
    control = _jacobian(0.5, 0.06, _agreement(28, 0.5, 0.5))
    figures = jacobian_figures(real, control)
    linear = figures["jacobian_share_linear"]
    assert (linear.value, linear.control) == (90.0, 50.0) and linear.informative
    assert linear.control_low == pytest.approx(100 * wilson(100, 200)[0])
    median = figures["jacobian_median_nonlinearity"]
    assert median.tolerance == NMSE_TOLERANCE and median.informative  # 0.01 > 5 % of 0.06
    sign = figures["agreement_jacobian_sign"]
    assert sign.control_high == pytest.approx(100 * wilson(14, 28)[1]) and sign.informative
    rho = figures["agreement_jacobian_spearman"]
    assert (rho.control_low, rho.control_high) == spearman_interval(0.5, 28)
    assert rho.informative  # 0.8 > 0.741
    assert len(figures) == 2 + 4 + 2
    close = jacobian_figures(_jacobian(0.52, 0.0601, None), control)  # inside 43.1–56.9 %
    assert not close["jacobian_share_linear"].informative
    assert not close["jacobian_median_nonlinearity"].informative
    # without the causal check on either side, only the linearity score is compared
    assert set(jacobian_figures(real, _jacobian(0.5, 0.06, None))) == {
        "jacobian_share_linear", "jacobian_median_nonlinearity",
    }  # fmt: skip


def test_control_config_keeps_the_headline_stages_and_trains_its_saes(tmp_path: Path) -> None:
    config = AnalyzeConfig(
        run_dir=str(tmp_path), control=True, sae_in="given", sae_out="given",
        stages=("connect", "calibrate", "logic", "outliers", "ablate", "report"),
    )  # fmt: skip
    control = control_config(config, RunLayout.of(tmp_path))
    assert control.stages == ("connect", "logic")
    assert control.run_dir == str(tmp_path / "control")
    assert not control.control and control.sae_in is None and control.sae_out is None
    assert (control.sae, control.sae_tokens, control.tokens, control.corpus, control.seed) == (
        config.sae, config.sae_tokens, config.tokens, config.corpus, config.seed,
    )  # fmt: skip
    # the default stages bring the jacobian stage too, in data-flow order
    everything = control_config(AnalyzeConfig(run_dir=str(tmp_path)), RunLayout.of(tmp_path))
    assert everything.stages == ("connect", "jacobian", "logic")
    only_logic = AnalyzeConfig(run_dir=str(tmp_path), stages=("connect", "logic", "report"))
    assert control_config(only_logic, RunLayout.of(tmp_path)).stages == ("connect", "logic")


def test_analyze_with_control_on_a_tiny_model(tmp_path: Path, one_thread: None) -> None:
    run = tmp_path / "run"
    config = tiny_config(run, stages=("connect", "calibrate", "jacobian", "logic"), control=True)
    summary = analyze(config)
    assert isinstance(summary, RunSummary) and summary.control is not None
    c = summary.control
    assert not c.reused and c.stages == ["connect", "jacobian", "logic"]
    # an ordinary run directory: its own SAEs, codes, stage results and summary
    control = RunLayout.of(run / "control")
    assert control.run_dir == RunLayout.of(run).control
    for path in (control.config, control.summary, control.connect.result, control.logic.result,
                 control.jacobian.result, control.causal.result, control.codes / "manifest.json",
                 control.sae_dir("mlp_out.1") / "cfg.json"):  # fmt: skip
        assert path.is_file(), path
    assert not control.calibrate.result.exists() and not control.report.path.exists()
    own = RunSummary.read(control.summary)
    assert own is not None and own.control is None
    assert own.model == "tiny-llama re-initialised (seed 0)" == c.model
    assert own.saes_trained_now == ["mlp_resid[1]", "mlp_out[1]"]
    # the same corpus tokens, different codes
    real_store, control_store = CodeStore.open(run / "codes"), CodeStore.open(control.codes)
    assert real_store.read_tokens().equals(control_store.read_tokens())
    assert (real_store.read_site("mlp_out.1") != control_store.read_site("mlp_out.1")).nnz > 0

    calibrated = summary.calibrate
    assert calibrated is not None and c.tau == calibrated.tau
    expected = {"linear_share_seed_tau", "linear_share_calibrated_tau", "connector_nmse_sparse",
                "connector_nmse_linear", "connector_nmse_mlp"}  # fmt: skip
    expected |= {f"labels_{k}" for k in summary.logic.counts if k != "DEAD"}  # type: ignore[union-attr]
    if calibrated.causal and calibrated.causal.judged and c.causal and c.causal.judged:
        expected |= {"causal_sign", "causal_size", "causal_both"}
    assert summary.jacobian is not None and c.jacobian is not None
    expected |= {"jacobian_share_linear", "jacobian_median_nonlinearity"}
    # the control's jacobian judged its agreement on the control's own causal check
    assert c.jacobian.agreement is not None and c.causal is not None
    assert c.jacobian.agreement.judged == c.causal.judged
    expected |= set(jacobian_figures(summary.jacobian, c.jacobian))
    assert set(c.figures) == expected
    # the control's share at the calibrated τ is its own table read at the run's τ, by hand
    at = relabel(
        pl.read_parquet(control.connect.features),
        LinearityConfig(tau=calibrated.tau, form=calibrated.form),
    )
    status = at.filter(pl.col("status") != "dead")["status"].to_numpy()
    shares = c.figures["linear_share_calibrated_tau"]
    assert shares.control == pytest.approx(100 * np.mean(status == "linear"))
    assert shares.value == calibrated.linear_calibrated.percent_linear
    nmse = c.figures["connector_nmse_linear"]
    assert c.connect is not None and nmse.control == c.connect.heldout_nmse_linear
    assert nmse.informative == judge(nmse.value, nmse.control)

    # summary.json holds it; the printed summary shows "value (control value)" and verdicts
    on_disk = json.loads((run / "summary.json").read_text())["control"]
    assert on_disk["figures"]["linear_share_seed_tau"]["informative"] == (
        c.figures["linear_share_seed_tau"].informative
    )
    text = format_summary(summary)
    assert "(control " in text and format_control(c) in text
    assert (UNINFORMATIVE in text) == bool(c.uninformative)
    # the layer page's table: one row per figure, the uninformative ones said in words
    page = "\n".join(control_section(load_run(run)))
    assert "## Headline vs control" in page
    assert all(f"| {f.label} |" in page for f in c.figures.values())
    assert page.count(f"**no**, {UNINFORMATIVE}") == len(c.uninformative)
    assert "No control" in "\n".join(control_section(load_run(control.run_dir)))

    # a finished control is read back, not rerun
    before = control.summary.read_bytes()
    again = analyze(config)
    assert again.control is not None and again.control.reused  # type: ignore[union-attr]
    assert again.control.figures == c.figures  # type: ignore[union-attr]
    assert control.summary.read_bytes() == before


def test_a_model_run_asks_for_one_layer_before_anything_loads(tmp_path: Path) -> None:
    from coact.errors import CoactError

    config = AnalyzeConfig(model="tiny-llama", layers=(0, 1), control=True, run_dir=str(tmp_path))
    with pytest.raises(CoactError, match="--control runs with --layer"):
        analyze(config)
    assert not any(tmp_path.iterdir())
