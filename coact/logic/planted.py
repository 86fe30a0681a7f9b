"""Planted circuits: input codes with realistic sparsity and correlation, and output codes
computed from them by known rules, so the connector → logic-label path can be scored.

Inputs. Every input fires on its own (a rate drawn log-uniformly in `rate_range`; the
SmolLM2 layer-3 residual features fire on 0.1–3 % of tokens, median 0.6 %) and, being one of a
group of `group_size` inputs that share a latent cause, also with probability `coupling`
whenever its group's cause is present (a group rate drawn in `group_rate_range`). The
shared cause is what makes inputs co-fire: circuits draw their inputs from one group, so
every row of their truth tables is seen. An active input i has the value s_i·u, where s_i
(its scale) is lognormal and u = exp(σ·z) with z standard normal truncated to [−2, 2]:
u lies in [u_min, u_max] = [e^(−2σ), e^(2σ)] (σ = `magnitude_sigma`). That is narrower
than real codes (on SmolLM2 layer 3 a feature's 1st and 99th percentiles are ≈ 0.15× and
3–4× its median): at the default σ = 0.25, u_max / u_min = e, so a threshold can sit
between one input's largest value and two inputs' usual sum and AND is a clean class; at
σ = 0.4 it cannot, and AND's rows turn mixed (analyses/bench_logic.py, stress rows).

Outputs, per rule (u_i = x_i / s_i the input in its own units; g a lognormal gain):
- WEIGHTED-SUM  y = g·Σ w_i u_i, 1–3 inputs, w_i ∈ [0.5, 1.5]: additive when several fire.
- OR            y = g·max_i w_i u_i, 2–3 inputs: each alone fires it, together they do not
                add up (a saturating OR; the additivity is what tells it from a sum).
- AND           y = g·ReLU(u_a + u_b − θ), θ = u_max: neither alone ever reaches θ, both
                together usually do (u_a + u_b > u_max unless both are small).
- A-AND-NOT-B   y = g·ReLU(w·u_a − c·u_b), c = 1.2·w·u_max / u_min: A alone fires it, any
                active B cancels it.
- NONLINEAR     a computation no logic label or sum describes, by kind (the label's kind):
                "product" y = g·w·u_a·(1 + 1.5·u_b), B a gain on A (superadditive);
                "cross" y = g·(w_a u_a + w_b u_b + 2·u_a u_b) (superadditive);
                "square" y = g·Σ (w_i u_i)², 1–2 inputs (curved);
                "xor" fires when exactly one of A, B is active (xor-like);
                "band" fires only when A's value lies in the middle third of its range, so
                P(fires | A) ≈ 1/3 (non-monotone).
- UNEXPLAINED   none of the labels fits: "independent" (fires at its own rate, from no
                input), "random" (fires on a random 35 % of A's tokens, whatever A's value).
- DEAD          never active.
Every alive output also fires on a few tokens from no input (`background_rate`: causes
outside the circuit), and active outputs carry multiplicative noise (`noise`).
Tokens form contexts of `context_length`, so held-out splits by context apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.connectors.exact import LassoPathConfig
from coact.logic.config import LABELS, LayerLabels, LogicConfig
from coact.logic.layer import label_layer

NONLINEAR_PLANTS = {  # planted rule → the kind a NONLINEAR label should name
    "product": "superadditive", "cross": "superadditive", "square": "curved",
    "xor": "xor-like", "band": "non-monotone",
}  # fmt: skip
UNEXPLAINED_KINDS = ("independent", "random")


@dataclass(frozen=True)
class PlantedConfig:
    n_tokens: int = 50_000
    n_inputs: int = 256
    context_length: int = 128
    rate_range: tuple[float, float] = (0.002, 0.02)  # own firing rate of an input
    group_size: int = 4  # inputs sharing a latent cause
    group_rate_range: tuple[float, float] = (0.005, 0.02)  # how often a group's cause is present
    coupling: float = 0.6  # P(member fires | its group's cause is present)
    scale_sigma: float = 0.5  # spread of the inputs' (and outputs') scales, lognormal
    magnitude_sigma: float = 0.25  # spread of an active value around its scale
    n_sum: int = 20
    n_or: int = 20
    n_and: int = 20
    n_and_not: int = 20
    n_nonlinear: int = 25  # cycling through NONLINEAR_PLANTS
    n_unexplained: int = 10  # cycling through independent, random
    n_dead: int = 5
    noise: float = 0.05  # relative sd of the multiplicative noise on active outputs
    background_rate: float = 5e-4  # tokens on which an output fires from no input
    seed: int = 0

    @property
    def n_outputs(self) -> int:
        counts = (self.n_sum, self.n_or, self.n_and, self.n_and_not, self.n_nonlinear,
                  self.n_unexplained)  # fmt: skip
        return sum(counts) + self.n_dead

    @property
    def u_range(self) -> tuple[float, float]:
        """The range of an active input's value in its own units."""
        return float(np.exp(-2 * self.magnitude_sigma)), float(np.exp(2 * self.magnitude_sigma))


@dataclass(frozen=True)
class PlantedCircuits:
    x: sp.csr_matrix  # tokens × n_inputs, float32, non-negative
    y: sp.csr_matrix  # tokens × n_outputs, float32, non-negative
    context_ids: np.ndarray  # token → context
    truth: pl.DataFrame  # per output: label, kind, inputs, negated, weights, threshold, gain
    input_scale: np.ndarray  # s_i
    groups: np.ndarray  # input → its group
    config: PlantedConfig

    def true_inputs(self) -> dict[int, set[int]]:
        rows = self.truth.select("output", "inputs").iter_rows()
        return {int(o): {int(i) for i in inputs} for o, inputs in rows}


def planted_circuits(config: PlantedConfig = PlantedConfig()) -> PlantedCircuits:
    """Inputs, outputs computed from them by known rules, and the answers (see module doc)."""
    if config.n_inputs < config.group_size or config.group_size < 3:
        raise ValueError("planted circuits need group_size ≥ 3 and at least one whole group")
    rng = np.random.default_rng(config.seed)
    # a last group smaller than group_size joins the one before it
    groups = np.minimum(
        np.arange(config.n_inputs) // config.group_size, config.n_inputs // config.group_size - 1
    )
    scale = rng.lognormal(0.0, config.scale_sigma, config.n_inputs)
    x = _inputs(config, groups, scale, rng)
    x_csc = x.tocsc()
    plan = _plan(config, groups, rng)
    rows, cols, vals = [], [], []
    for o, (label, kind, inputs, negated, weights, threshold) in enumerate(plan):
        gain = float(rng.lognormal(0.0, config.scale_sigma))
        tokens, value = _output(config, x_csc, scale, kind, inputs, weights, threshold, rng)
        if label != "DEAD":
            tokens, value = _background(config, tokens, value * gain, gain, rng)
            value = value * np.maximum(1 + config.noise * rng.standard_normal(len(value)), 0.0)
        keep = value > 0
        rows.append(tokens[keep])
        cols.append(np.full(int(keep.sum()), o))
        vals.append(value[keep])
        plan[o] = (label, kind, inputs, negated, weights, threshold, gain)
    y = sp.csr_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(config.n_tokens, len(plan)),
    )
    truth = pl.DataFrame(
        {
            "output": np.arange(len(plan)),
            "label": [p[0] for p in plan],
            "kind": [p[1] for p in plan],
            "inputs": [list(p[2]) for p in plan],
            "negated": [p[3] for p in plan],
            "weights": [list(p[4]) for p in plan],
            "threshold": [p[5] for p in plan],
            "gain": [p[6] for p in plan],
        },
        schema={
            "output": pl.Int64,
            "label": pl.String,
            "kind": pl.String,
            "inputs": pl.List(pl.Int64),
            "negated": pl.Int64,
            "weights": pl.List(pl.Float64),
            "threshold": pl.Float64,
            "gain": pl.Float64,
        },
    )
    contexts = np.arange(config.n_tokens) // config.context_length
    return PlantedCircuits(x, y, contexts, truth, scale, groups, config)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float], n: int) -> np.ndarray:
    low, high = np.log(bounds[0]), np.log(bounds[1])
    return np.exp(rng.uniform(low, high, n))


def _magnitudes(rng: np.random.Generator, sigma: float, n: int) -> np.ndarray:
    """u = exp(σ z), z standard normal truncated to [−2, 2] (redrawn, not clipped)."""
    z = rng.standard_normal(n)
    bad = np.abs(z) > 2
    while bad.any():
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2
    return np.exp(sigma * z)


def _inputs(
    config: PlantedConfig, groups: np.ndarray, scale: np.ndarray, rng: np.random.Generator
) -> sp.csr_matrix:
    """Own firing plus firing with the group's cause; values s_i·u."""
    n, n_in = config.n_tokens, config.n_inputs
    own = _log_uniform(rng, config.rate_range, n_in)
    n_groups = int(groups.max()) + 1
    cause = _log_uniform(rng, config.group_rate_range, n_groups)
    keys = []
    for i in range(n_in):
        keys.append(i * n + rng.integers(0, n, rng.binomial(n, own[i])))
    for g in range(n_groups):
        present = rng.integers(0, n, rng.binomial(n, cause[g]))
        for member in np.flatnonzero(groups == g):
            keys.append(member * n + present[rng.random(len(present)) < config.coupling])
    key = np.unique(np.concatenate(keys))
    col, row = np.divmod(key, n)
    values = scale[col] * _magnitudes(rng, config.magnitude_sigma, len(key))
    return sp.csr_matrix((values.astype(np.float32), (row, col)), shape=(n, n_in))


def _plan(config: PlantedConfig, groups: np.ndarray, rng: np.random.Generator) -> list:
    """Per output: (label, kind, inputs, negated, weights, threshold), inputs from one group."""
    u_min, u_max = config.u_range
    n_groups = int(groups.max()) + 1

    def members(count: int) -> tuple[int, ...]:
        group = np.flatnonzero(groups == rng.integers(n_groups))
        return tuple(int(i) for i in rng.choice(group, count, replace=False))

    def weights(count: int) -> tuple[float, ...]:
        return tuple(float(w) for w in rng.uniform(0.5, 1.5, count))

    plan: list = []
    for _ in range(config.n_sum):
        count = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
        plan.append(("WEIGHTED-SUM", "sum", members(count), None, weights(count), None))
    for _ in range(config.n_or):
        count = int(rng.choice([2, 3]))
        plan.append(("OR", "max", members(count), None, weights(count), None))
    for _ in range(config.n_and):
        plan.append(("AND", "and", members(2), None, (1.0, 1.0), u_max))
    for _ in range(config.n_and_not):
        a, b = members(2)
        w = float(rng.uniform(0.5, 1.5))
        plan.append(("A-AND-NOT-B", "and_not", (a, b), b, (w, -1.2 * w * u_max / u_min), 0.0))
    plants = list(NONLINEAR_PLANTS)
    for k in range(config.n_nonlinear):
        kind = plants[k % len(plants)]
        count = {"band": 1, "square": int(rng.choice([1, 2]))}.get(kind, 2)
        plan.append(("NONLINEAR", kind, members(count), None, weights(count), None))
    for k in range(config.n_unexplained):
        kind = UNEXPLAINED_KINDS[k % len(UNEXPLAINED_KINDS)]
        inputs = {"random": members(1), "independent": ()}[kind]
        plan.append(("UNEXPLAINED", kind, inputs, None, (1.0,) * len(inputs), None))
    plan.extend(("DEAD", "dead", (), None, (), None) for _ in range(config.n_dead))
    return plan


def _output(
    config: PlantedConfig,
    x_csc: sp.csc_matrix,
    scale: np.ndarray,
    kind: str,
    inputs: tuple[int, ...],
    weights: tuple[float, ...],
    threshold: float | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, value before gain) on the tokens where any input is active."""
    if kind == "dead":
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    if kind == "independent":
        rate = _log_uniform(rng, config.rate_range, 1)[0]
        tokens = np.unique(rng.integers(0, config.n_tokens, rng.binomial(config.n_tokens, rate)))
        return tokens, _magnitudes(rng, config.magnitude_sigma, len(tokens))
    cols = [x_csc[:, [i]] for i in inputs]
    tokens = np.unique(np.concatenate([c.indices for c in cols]))
    u = np.zeros((len(tokens), len(inputs)))
    for j, (i, c) in enumerate(zip(inputs, cols, strict=True)):
        u[np.searchsorted(tokens, c.indices), j] = c.data / scale[i]
    w = np.asarray(weights)
    if kind == "sum":
        value = u @ w
    elif kind == "max":
        value = (u * w).max(axis=1)
    elif kind == "and":
        assert threshold is not None
        value = np.maximum(u.sum(axis=1) - threshold, 0.0)
    elif kind == "and_not":
        value = np.maximum(u @ w, 0.0)
    elif kind == "xor":
        on = u > 0
        value = np.where(on.sum(axis=1) == 1, u.sum(axis=1), 0.0)
    elif kind in ("product", "cross", "square", "random"):
        value = _nonlinear(kind, u, w, rng)
    elif kind == "band":
        s = config.magnitude_sigma
        value = np.where((u[:, 0] > np.exp(-0.43 * s)) & (u[:, 0] < np.exp(0.43 * s)), u[:, 0], 0)
    else:
        raise ValueError(f"unknown planted rule {kind!r}")
    return tokens, value


def _nonlinear(kind: str, u: np.ndarray, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The planted NONLINEAR (product, cross, square) and UNEXPLAINED (random) rules."""
    if kind == "product":
        return w[0] * u[:, 0] * (1 + 1.5 * u[:, 1])
    if kind == "cross":
        return u @ w + 2 * u[:, 0] * u[:, 1]
    if kind == "square":
        return ((u * w) ** 2).sum(axis=1)
    return np.where(rng.random(len(u)) < 0.35, u[:, 0], 0.0)


def _background(
    config: PlantedConfig,
    tokens: np.ndarray,
    value: np.ndarray,
    gain: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Add firing from causes outside the circuit on a few random tokens."""
    extra = rng.integers(0, config.n_tokens, rng.binomial(config.n_tokens, config.background_rate))
    extra = np.setdiff1d(extra, tokens)
    more = gain * _magnitudes(rng, config.magnitude_sigma, len(extra))
    order = np.argsort(np.concatenate([tokens, extra]), kind="stable")
    return np.concatenate([tokens, extra])[order], np.concatenate([value, more])[order]


# --- the connector → labeller path, and its score ----------------------------------------


def connector_weights(
    x: sp.spmatrix,
    y: sp.spmatrix,
    context_ids: np.ndarray,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    path: LassoPathConfig | None = None,
    magnitude: float = 0.05,
) -> tuple[pl.DataFrame, dict[str, float]]:
    """The sparse linear connector exactly as `coact.connectors.stage` fits it (Gram statistics of
    the training contexts, the L1 path, the elbow of held-out error against mean ‖w‖₁, the
    least-squares refit on the chosen support) and its weights table, for codes that are
    not in a store. Returns the table and the chosen α with its held-out NMSE."""
    from coact.connectors.exact import GramStats
    from coact.connectors.stage import fit_sparse, weights_table
    from coact.connectors.train import split_rows

    x, y = sp.csr_matrix(x), sp.csr_matrix(y)
    train, held = split_rows(x.shape[0], heldout_fraction, seed, context_ids)
    stats = GramStats.empty(x.shape[1], y.shape[1]).add(x[train], y[train])
    stats_held = GramStats.empty(x.shape[1], y.shape[1]).add(x[held], y[held])
    fit = fit_sparse(stats, stats_held, path or LassoPathConfig(), magnitude, progress=False)
    chosen = fit.chosen
    info = {"alpha": float(fit.path.alphas[chosen]), "alpha_index": chosen,
            "heldout_nmse": float(fit.sweep.row(chosen, named=True)["heldout_nmse"])}  # fmt: skip
    return weights_table(fit.coef, fit.refit, stats, magnitude), info


@dataclass(frozen=True)
class PlantedScore:
    accuracy: float  # A-AND-NOT-B right only with the right negated input, NONLINEAR kind
    per_class: dict[str, float]  # accuracy per true label
    confusion: pl.DataFrame  # true label × predicted label, counts
    precision: float  # of the labeller's inputs, pooled over (output, input) pairs
    recall: float
    f1: float
    n_outputs: int
    per_kind: dict[str, float] = field(default_factory=dict)  # accuracy per planted rule

    def as_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "per_class": self.per_class,
            "confusion": {
                row["true"]: {k: v for k, v in row.items() if k != "true"}
                for row in self.confusion.iter_rows(named=True)
            },
            "support": {"precision": self.precision, "recall": self.recall, "f1": self.f1},
            "n_outputs": self.n_outputs,
            "per_kind": self.per_kind,
        }


def score_labels(circuits: PlantedCircuits, features: pl.DataFrame) -> PlantedScore:
    """Labels and inputs of `label_layer` against the planted answers."""
    found_kind = features["kind"] if "kind" in features.columns else pl.lit(None, pl.String)
    truth = circuits.truth.join(
        features.select("output", pl.col("label").alias("predicted"),
                        pl.col("inputs").alias("found"), pl.col("negated").alias("found_negated"),
                        found_kind.alias("found_kind")),
        on="output", how="left",
    )  # fmt: skip
    right = (truth["label"] == truth["predicted"]).to_numpy()
    negation = (truth["negated"].fill_null(-1) == truth["found_negated"].fill_null(-1)).to_numpy()
    right &= np.where(truth["label"].to_numpy() == "A-AND-NOT-B", negation, True)
    expected = truth["kind"].replace_strict(NONLINEAR_PLANTS, default=None).fill_null("")
    kind_ok = (expected == truth["found_kind"].fill_null("")).to_numpy()
    right &= np.where(truth["label"].to_numpy() == "NONLINEAR", kind_ok, True)
    labels = truth["label"].to_numpy()
    per_class = {c: float(right[labels == c].mean()) for c in LABELS if (labels == c).any()}
    kinds = truth["kind"].to_numpy()
    per_kind = {str(c): float(right[kinds == c].mean()) for c in np.unique(kinds)}
    confusion = (
        truth.group_by("label", "predicted").len()
        .pivot(on="predicted", index="label", values="len").fill_null(0)
        .rename({"label": "true"})
    )  # fmt: skip
    order = {c: i for i, c in enumerate(LABELS)}
    columns = sorted((c for c in confusion.columns if c != "true"), key=lambda c: order.get(c, 9))
    confusion = confusion.select("true", *columns).sort(
        pl.col("true").replace_strict(order, return_dtype=pl.Int64)
    )
    tp = fp = fn = 0
    for inputs, found in truth.select("inputs", "found").iter_rows():
        true, got = set(inputs), set(found or [])
        tp, fp, fn = tp + len(true & got), fp + len(got - true), fn + len(true - got)
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return PlantedScore(
        float(right.mean()), per_class, confusion, precision, recall, f1, len(labels), per_kind
    )


def run_planted(
    config: PlantedConfig = PlantedConfig(),
    logic: LogicConfig | None = None,
    path: LassoPathConfig | None = None,
    progress: bool = False,
) -> tuple[PlantedCircuits, LayerLabels, PlantedScore, dict[str, float]]:
    """Plant, fit the connector as `connect` does, label every output, score."""
    circuits = planted_circuits(config)
    weights, info = connector_weights(circuits.x, circuits.y, circuits.context_ids, path=path)
    labels = label_layer(
        circuits.x, circuits.y, weights, logic or LogicConfig(), progress=progress,
        contexts=circuits.context_ids,
    )  # fmt: skip
    return circuits, labels, score_labels(circuits, labels.features), info
