"""τ's power: the paired half-width against a hand-computed t-interval, the stopping rule on
a synthetic sequence, the zero-ablation ΔCE against a forward hook and a hand CE, and the
stage's power figures against a one-shot calibration on the same contexts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coact.calibrate.power import (
    CalibrationPower,
    PairedLosses,
    add_until_powered,
    epsilon_share,
    paired_interval,
)


def test_half_width_is_the_t_interval_over_contexts() -> None:
    # per-token extra CE of five contexts of 10 predicted positions each:
    # mean 0.18; squared deviations sum to 0.228, var 0.057, sd 0.2387467, se 0.1067708;
    # t(0.975, 4) = 2.7764451, half-width 0.2964432
    per_token = np.array([0.3, -0.1, 0.2, 0.5, 0.0])
    paired = PairedLosses(per_token * 10, np.full(5, 10))
    point, halfwidth = paired_interval(paired, level=0.95)
    assert point == pytest.approx(0.18)
    assert halfwidth == pytest.approx(0.2964432, abs=1e-6)
    # a 90 % interval: t(0.95, 4) = 2.1318468
    assert paired_interval(paired, 0.90)[1] == pytest.approx(2.1318468 * 0.1067708, abs=1e-6)
    # one context gives no spread to measure
    assert paired_interval(PairedLosses(np.array([0.1]), np.array([10])), 0.95)[1] == math.inf


def test_half_width_weighs_tokens_not_contexts() -> None:
    """A context of 20 positions counts as two of 10 in the point estimate."""
    paired = PairedLosses(np.array([2.0, 0.0, 1.0]), np.array([20, 10, 10]))
    point, halfwidth = paired_interval(paired)
    assert point == pytest.approx(3.0 / 40)
    # residuals e = extra − point·n = (0.5, −0.75, 0.25): Σe² = 0.875, se = √(0.875/2/3)/(40/3)
    se = math.sqrt(0.875 / 2 / 3) / (40 / 3)
    assert halfwidth == pytest.approx(4.3026527 * se, abs=1e-6)  # t(0.975, 2) = 4.3026527


def _sequence() -> tuple[PairedLosses, list[tuple[int, int]], object]:
    """Four contexts of ±1 (one position each), then contexts of 0: the half-width after
    C contexts is t(0.975, C−1)·√(4/(C−1))/√C: 1.8374 (4), 0.6320 (8), 0.3831 (12),
    0.2752 (16)."""
    calls: list[tuple[int, int]] = []

    def more(lo: int, hi: int) -> PairedLosses:
        calls.append((lo, hi))
        return PairedLosses(np.zeros(hi - lo), np.ones(hi - lo, dtype=np.int64))

    first = PairedLosses(np.array([1.0, -1.0, 1.0, -1.0]), np.ones(4, dtype=np.int64))
    return first, calls, more


def test_contexts_are_added_until_the_half_width_is_under_target() -> None:
    first, calls, more = _sequence()
    run = add_until_powered(first, more, target=0.4, cap=64, step=4)  # type: ignore[arg-type]
    assert calls == [(4, 8), (8, 12)]
    assert run.powered and run.n_contexts == 12 and run.batches_added == 2
    assert run.halfwidth == pytest.approx(0.38314, abs=1e-4)
    assert run.extra_delta_ce == 0.0


def test_the_rule_flags_tau_at_the_cap() -> None:
    first, calls, more = _sequence()
    run = add_until_powered(first, more, target=0.1, cap=16, step=4)  # type: ignore[arg-type]
    assert calls == [(4, 8), (8, 12), (12, 16)]
    assert not run.powered and run.n_contexts == 16
    assert run.halfwidth == pytest.approx(0.27517, abs=1e-4)
    first, calls, more = _sequence()
    run = add_until_powered(first, more, target=0.1, cap=14, step=4)  # type: ignore[arg-type]
    assert calls == [(4, 8), (8, 12), (12, 14)]  # the last batch stops at the cap
    assert not run.powered and run.n_contexts == 14


def test_a_powered_start_adds_nothing() -> None:
    first, calls, more = _sequence()
    run = add_until_powered(first, more, target=2.0, cap=64, step=4)  # type: ignore[arg-type]
    assert calls == [] and run.powered and run.n_contexts == 4


def test_shortfall_names_the_limit_that_stopped_it() -> None:
    power = CalibrationPower(
        total_effect=0.1, epsilon_share=0.1, extra_delta_ce=0.002, halfwidth=0.008,
        target_halfwidth=0.005, n_contexts_used=64, n_contexts_cap=64,
        n_contexts_available=79, powered=False,
    )  # fmt: skip
    assert "cap of 64" in (power.shortfall() or "")
    exhausted = CalibrationPower(
        **{**power.__dict__, "n_contexts_cap": 32, "n_contexts_available": 32}
    )
    assert "all 32 held-out contexts" in (exhausted.shortfall() or "")
    assert CalibrationPower(**{**power.__dict__, "powered": True}).shortfall() is None
    assert epsilon_share(0.01, 0.2) == pytest.approx(0.05)
    assert math.isnan(epsilon_share(0.01, 0.0))


def _zero_ablation_by_hand(lm, tokens: torch.Tensor, layer: int, skip: int) -> float:
    """ΔCE per predicted position (from position `skip` on) with the MLP's output zeroed
    at positions ≥ skip by a forward hook, CE computed from log-softmax by hand."""
    mlp = lm.model.get_submodule(lm.adapter.mlp_path(layer))

    def zero(_module, _inputs, output):
        assert isinstance(output, torch.Tensor)
        output = output.clone()
        output[:, skip:] = 0
        return output

    def ce() -> float:
        with torch.no_grad():
            logits = lm.model(tokens).logits.double()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
        return float(nll[:, skip:].mean())

    clean = ce()
    handle = mlp.register_forward_hook(zero)
    try:
        ablated = ce()
    finally:
        handle.remove()
    return ablated - clean


def test_zero_ablation_delta_ce_matches_a_forward_hook(tiny) -> None:
    from coact.calibrate.intervene import splice_table
    from coact.models.sites import Site
    from tests.planted_model import random_tokens

    tokens = random_tokens(6, 12, seed=3)
    table = splice_table(
        tiny, tokens, Site("mlp_out", 0), {}, batch_size=4, skip_first_positions=1, n_boot=0
    )
    zero = table.filter(table["splice"] == "zero").row(0, named=True)
    expected = _zero_ablation_by_hand(tiny, tokens, 0, skip=1)
    assert abs(expected) > 1e-4  # zeroing the MLP changes the tiny model's loss
    assert zero["delta_ce"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_power_adds_held_out_contexts_and_agrees_with_a_one_shot_calibration(tmp_path) -> None:
    """The threshold plant calibrated on 8 contexts with ε = 5e-4 (every candidate τ
    passes, but the half-width stays above ε/2): τ's power adds the other 16 held-out
    contexts, and its extra ΔCE and half-width are those of the τ row of a calibration on
    all 24; the total effect is the zero ablation by hand (on random tokens, zeroing the
    planted MLP lowers the loss: ε has no share of it)."""
    import polars as pl

    from tests.test_calibrate import calibrated_plant

    tolerance = 5e-4
    grown, _, _, _ = calibrated_plant(
        "threshold", tmp_path / "grown", contexts=8, max_contexts=24, tolerance=tolerance,
        causal=False,
    )  # fmt: skip
    whole, out, plant, held = calibrated_plant(
        "threshold", tmp_path / "whole", contexts=24, max_contexts=24, tolerance=tolerance,
        causal=False,
    )  # fmt: skip
    power = grown.power
    assert power is not None and whole.power is not None
    assert grown.n_contexts == 8 and power.n_contexts_available == 24
    assert power.n_contexts_used == 24 and power.n_contexts_cap == 24
    assert not power.powered and power.halfwidth > tolerance / 2
    assert "all 24 held-out contexts" in (power.shortfall() or "")
    assert grown.tau == whole.tau  # every τ passes on either sample
    splices = pl.read_parquet(out / "splices.parquet")
    row = splices.filter(pl.col("tau") == whole.tau).row(0, named=True)
    assert power.extra_delta_ce == pytest.approx(row["extra_delta_ce"], rel=1e-6, abs=1e-9)
    assert power.halfwidth == pytest.approx(whole.power.halfwidth, rel=1e-6)
    # the total effect is the zero splice on the calibration contexts, and a hook's
    zero = splices.filter(pl.col("splice") == "zero").row(0, named=True)
    assert whole.power.total_effect == pytest.approx(zero["delta_ce"])
    by_hand = _zero_ablation_by_hand(plant.lm, held[:24], plant.layer, skip=1)
    assert abs(by_hand) > 1e-3 and whole.power.total_effect == pytest.approx(by_hand, rel=1e-4)
    assert by_hand < 0 and math.isnan(whole.power.epsilon_share)
    _check_words(grown, whole)


def _check_words(underpowered, powered) -> None:
    """The CLI's line and the layer page's paragraph say powered or underpowered, and why."""
    import dataclasses

    from coact.report.calibration_section import power_paragraph
    from coact.report.text import format_calibrate

    assert "τ is underpowered: the 95% half-width" in format_calibrate(underpowered)
    assert underpowered.power is not None and powered.power is not None
    text = power_paragraph(underpowered.power, 8, 5e-4)
    assert "τ is underpowered" in text and "after all 24 held-out contexts" in text
    assert "is no share of it" in text  # zeroing the planted MLP lowers the loss
    shown = dataclasses.replace(powered.power, powered=True, epsilon_share=0.25)
    text = power_paragraph(shown, 24, 5e-4)
    assert "τ is powered" in text and "25.0%" in text and "underpowered" not in text
    assert "rules out no splice" not in text
    whole_effect = dataclasses.replace(shown, epsilon_share=1.5)
    assert "rules out no splice" in power_paragraph(whole_effect, 24, 5e-4)
    line = format_calibrate(dataclasses.replace(powered, power=shown))
    assert "powered (≤ ε/2)" in line and "ε is 25.0% of it" in line
