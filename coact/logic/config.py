"""Labels, rule names, settings and result types, kept apart so every module shares them."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from coact.settings import setting

LABELS = ("WEIGHTED-SUM", "OR", "AND", "A-AND-NOT-B", "NONLINEAR", "UNEXPLAINED", "DEAD")
SUM, OR, AND, AND_NOT, NONLINEAR, UNEXPLAINED, DEAD = range(7)
_LEVEL_SILENT, _LEVEL_MIXED, _LEVEL_FIRES, _LEVEL_UNSEEN = 0, 1, 2, -1
# Which rule decided (the `rule` column), and the label each gives.
REASONS = ("dead", "no inputs", "uncovered", "veto", "conjunction", "saturating", "additive",
           "additivity untested", "no rule fits", "superadditive", "curved", "non-monotone",
           "xor-like")  # fmt: skip
_REASON_LABEL = (DEAD, UNEXPLAINED, UNEXPLAINED, AND_NOT, AND, OR, SUM, SUM, UNEXPLAINED,
                 NONLINEAR, NONLINEAR, NONLINEAR, NONLINEAR)  # fmt: skip
# A NONLINEAR label's kind is its rule: one of these.
NONLINEAR_KINDS = ("superadditive", "curved", "non-monotone", "xor-like")
MAX_INPUTS = 6  # the cap on a truth table's inputs: 64 rows


@dataclass(frozen=True)
class LogicConfig:
    # k: inputs per target, grown until `coverage_target` is met (at most MAX_INPUTS)
    max_inputs: int = setting(4, "inputs per feature, at most (1–6)")
    floor: float = 0.1  # active above floor × the feature's median active value
    min_standardised: float = 0.05  # candidate inputs: |w|·sd(x_i)/sd(y) at least this...
    relative_cut: float = 0.2  # ...and at least this share of the target's strongest
    min_tokens: int = 20  # tokens for a truth-table row to count as observed
    p_fire: float = 0.5  # an observed row fires at P(target active) ≥ this
    p_silent: float = 0.1  # and is silent at P ≤ this
    max_uncovered: float = 0.5  # UNEXPLAINED above this share of activations with no input
    additive_cut: float = 0.5  # additivity s below this: OR; at or above: WEIGHTED-SUM
    prune: bool = True  # drop inputs that never change the truth table
    complete: bool = True  # add inputs the connector missed, by conditional information
    min_g: float = 30.0  # an addition's G = 2 N ln2 · I(T; X | row) at least this
    n_boot: int = 200  # bootstrap resamples of contexts for the confidence
    coverage_target: float = 0.8  # inputs are added until they cover this share of mass...
    min_lift: float = 2.0  # ...from candidates with P(T | X) ≥ min_lift · P(T)
    jacobian_inputs: int = 64  # the Jacobian's strongest inputs per target among the candidates
    coverage_search: int = 64  # inputs searched to count how many 80 % coverage would need
    heldout_fraction: float = 0.2  # contexts held out for the truth table's AUC
    superadditive_cut: float = 1.3  # Σy / Σβx on multi-input rows at least this: superadditive
    curvature_cut: float = 0.3  # share of the affine fit's residual a square term removes
    nonmonotone_cut: float = 0.5  # middle tertile's mean above both outer ones by this share
    magnitude_cut: float = 0.3  # an input is kept when it changes a row's mean by this share
    cluster: bool = True
    min_cluster_size: int = 10  # tokens, and at least min_cluster_share of the sample
    min_cluster_share: float = 0.05
    max_cluster_points: int = 256  # tokens per clustering, a systematic sample
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.max_inputs <= MAX_INPUTS:
            raise ValueError(f"max_inputs must be 1–{MAX_INPUTS}, got {self.max_inputs}")
        if not 0 <= self.p_silent < self.p_fire <= 1:
            raise ValueError("need 0 ≤ p_silent < p_fire ≤ 1")


@dataclass(frozen=True)
class LayerLabels:
    """`features`: one row per target; `truth_tables`: one row per target and pattern;
    `clusters`: one row per target, kind ("fires" / "suppressed") and cluster (−1: noise)."""

    features: pl.DataFrame
    truth_tables: pl.DataFrame
    clusters: pl.DataFrame
