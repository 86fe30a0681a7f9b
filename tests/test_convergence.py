"""The convergence study (analyses/convergence.py): the settled rule on hand-made numbers,
the verdicts of a ladder, the figures' intervals, the code offset that keeps a ladder's
codes on unseen tokens, and the quick mode end to end (JSON shape, chart, resuming)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from coact.linearity.table import LinearShare
from coact.models.load import load_model
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.shared import run_contexts
from tests.scripts import analyses_script

conv = analyses_script("convergence")


def test_settled_inside_the_last_interval() -> None:
    # the previous value inside the last step's [low, high], bounds included
    assert conv.settled(70.0, 71.0, 68.0, 74.0) is True
    assert conv.settled(74.0, 71.0, 68.0, 74.0) is True
    assert conv.settled(68.0, 71.0, 68.0, 74.0) is True
    assert conv.settled(74.5, 71.0, 68.0, 74.0) is False
    assert conv.settled(60.0, 71.0, 68.0, 74.0) is False
    # a degenerate interval: only no move at all is settled
    assert conv.settled(100.0, 100.0, 100.0, 100.0) is True
    assert conv.settled(99.6, 100.0, 100.0, 100.0) is False


def test_settled_by_the_relative_tolerance() -> None:
    # |0.52 − 0.50| = 0.02 ≤ 0.05 × 0.52 = 0.026; |0.53 − 0.50| = 0.03 > 0.0265
    assert conv.settled(0.50, 0.52) is True
    assert conv.settled(0.50, 0.53) is False
    assert conv.settled(0.53, 0.50) is False  # the larger magnitude either way
    assert conv.settled(0.0, 0.0) is True
    assert conv.settled(1.0, 1.2, tolerance=0.2) is True  # 0.2 ≤ 0.2 × 1.2 = 0.24
    assert conv.settled(1.0, 1.3, tolerance=0.2) is False  # 0.3 > 0.26
    # an interval that is not finite falls back on the tolerance
    assert conv.settled(0.50, 0.52, math.nan, 0.6) is True


def test_settled_is_none_without_numbers() -> None:
    assert conv.settled(None, 1.0) is None
    assert conv.settled(1.0, None) is None
    assert conv.settled(math.nan, 1.0) is None
    assert conv.settled(1.0, 1.01, tolerance=None) is None


def _step(budget: int, share: float, low: float, high: float, nmse: float) -> object:
    return conv.Step(
        budget=budget, run_dir="r", tokens=budget, sae_tokens=400_000,
        code_offset_tokens=400_000, seconds=1.0, timings={}, reused=False, tau=0.01,
        figures={
            "linear_share_seed_tau": conv.FigureValue(value=share, low=low, high=high, n=100),
            "connector_nmse_sparse": conv.FigureValue(value=nmse),
        },
    )  # fmt: skip


def test_verdicts_judge_the_last_doubling_and_the_one_ending_at_the_default() -> None:
    steps = [
        _step(25_000, 60.0, 50.0, 70.0, 0.40),
        _step(50_000, 70.0, 65.0, 75.0, 0.30),
        _step(100_000, 72.0, 69.0, 74.0, 0.29),  # 70 in [69, 74]; 0.01 ≤ 0.05 × 0.30
        _step(200_000, 80.0, 78.0, 82.0, 0.25),  # 72 not in [78, 82]; 0.04 > 0.05 × 0.29
    ]
    last, at_default = conv.verdicts(steps, 100_000)
    assert set(last) == set(conv.FIGURES) == set(at_default)
    share, nmse = at_default["linear_share_seed_tau"], at_default["connector_nmse_sparse"]
    assert share.budgets == [50_000, 100_000]
    assert (share.previous, share.last, share.low, share.high) == (70.0, 72.0, 69.0, 74.0)
    assert share.move == pytest.approx(2.0)
    assert share.settled is True and share.tolerance is None
    assert nmse.settled is True and nmse.tolerance == pytest.approx(0.05)
    assert nmse.low is None and nmse.move == pytest.approx(-0.01)
    assert last["linear_share_seed_tau"].budgets == [100_000, 200_000]
    assert last["linear_share_seed_tau"].settled is False
    assert last["connector_nmse_sparse"].settled is False
    assert last["jacobian_share_linear"].settled is None  # measured by neither step
    # the default not reached, or reached first: no verdict at the default
    assert conv.verdicts(steps[:2], 100_000)[1] == {}
    assert conv.verdicts(steps[2:], 100_000)[1] == {}
    assert conv.verdicts(steps[:1], 25_000) == ({}, {})


def test_share_interval_is_the_noise_floor_bracket_else_wilson() -> None:
    bracket = LinearShare(
        percent_linear=80.0, linear=8, nonlinear=2, dead=0, alive=10,
        percent_linear_confident=60.0, percent_linear_possible=90.0,
    )  # fmt: skip
    assert conv._share(bracket) == conv.FigureValue(value=80.0, low=60.0, high=90.0, n=10)
    # 8 of 10: Wilson 95 % = (0.8 + z²/20 ∓ z √(0.016 + z²/400)) / (1 + z²/10), z = 1.96
    plain = conv._share(LinearShare(percent_linear=80.0, linear=8, nonlinear=2, dead=0, alive=10))
    assert plain.low == pytest.approx(49.02, abs=0.01)
    assert plain.high == pytest.approx(94.33, abs=0.01)
    judged = conv._proportion(0.25, 4)  # 1 of 4
    assert judged.value == 25.0 and judged.n == 4
    assert judged.low == pytest.approx(4.56, abs=0.01) and judged.high == pytest.approx(
        69.94, abs=0.01
    )
    assert conv._proportion(math.nan, 0).value is None


def test_code_offset_keeps_given_saes_on_the_trained_run_s_code_tokens() -> None:
    lm = load_model("tiny-llama")
    trained = AnalyzeConfig(model="tiny-llama", tokens=620, sae_tokens=930, ctx_len=32)
    _, codes = run_contexts(trained, lm)
    given = AnalyzeConfig(
        model="tiny-llama", tokens=620, sae_tokens=930, ctx_len=32, sae_in="a", sae_out="b",
        code_offset_tokens=930,
    )  # fmt: skip
    none, same = run_contexts(given, lm)
    assert none.tokens.shape[0] == 0 and codes.tokens.shape[0] == 20  # 620 / 31
    assert bool((same.tokens == codes.tokens).all())
    # without the offset, given SAEs' codes start at the corpus' first token
    _, first = run_contexts(dataclasses.replace(given, code_offset_tokens=None), lm)
    assert not bool((first.tokens == codes.tokens).all())


def test_quick_study_writes_its_json_and_chart_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "study"
    args = ["--quick", "--root", str(root), "--max-code-tokens", "2000", "--max-sae-tokens", "3000"]
    assert conv.main(args) == 0
    data = json.loads((root / "convergence.json").read_text())
    assert data["quick"] is True and data["model"] == "tiny-llama"
    assert set(data["figures"]) == set(conv.FIGURES)
    code, sae = data["ladders"]["code"], data["ladders"]["sae"]
    assert [s["budget"] for s in code["steps"]] == [1_000, 2_000]
    assert [s["budget"] for s in sae["steps"]] == [1_500, 3_000]
    assert code["planned"] == list(conv.QUICK_CODE_LADDER) and not code["failed"]
    # the code ladder's SAEs fixed, its codes after their training tokens; the SAE
    # ladder's codes the same tokens at every step, after its largest training budget
    assert {(s["sae_tokens"], s["code_offset_tokens"]) for s in code["steps"]} == {(3000, 3000)}
    assert {(s["tokens"], s["code_offset_tokens"]) for s in sae["steps"]} == {(2015, 6000)}
    for ladder in (code, sae):
        for step in ladder["steps"]:
            assert step["seconds"] > 0 and step["reused"] is False
            assert {"linear_share_seed_tau", "connector_nmse_mlp"} <= set(step["figures"])
        assert ladder["at_default"] == ladder["last"]  # the default is the last step here
        for v in ladder["at_default"].values():
            assert v["settled"] == conv.settled(
                v["previous"], v["last"], v["low"], v["high"], v["tolerance"]
            )
    assert code["at_default"]["linear_share_seed_tau"]["budgets"] == [1_000, 2_000]
    assert (root / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    # a second call reads every finished step back
    assert conv.main(args) == 0
    again = json.loads((root / "convergence.json").read_text())
    assert all(s["reused"] for ladder in again["ladders"].values() for s in ladder["steps"])
    assert again["ladders"]["code"]["at_default"] == code["at_default"]
