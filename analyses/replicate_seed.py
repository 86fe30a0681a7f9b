"""Replication of the seed study: which MLP-output features are computed linearly, per layer.

The seed study (Pythia-70m-deduped, 3072-feature SAEs on the residual stream each MLP reads
and on the MLP's output) fitted four connector families without L1 from input features to
output features, then called an output feature linear when its held-out MSE under the
linear connector exceeds the MLP connector's by at most τ = 0.001, with MSEs rescaled by
(min layer norm / layer norm)². It found 78.8 / 95.9 / 97.8 / 98.0 / 98.9 % of alive
MLP-output features linear for MLP layers 1–5.

Per layer this script runs `coact.pipeline.run.analyze` (SAEs trained or loaded, feature codes,
L1 path, linearity table; reused from the run directory when already there), estimates the
layer's output norm (mean ‖decoded mlp_out activation‖ over stored tokens), then fits the
four families (linear, relu, mlp, two-relu) without L1 on the stored codes with one fixed
budget. Across layers it writes to analyses/results/replication/<model-slug>/:

    families.parquet        layer × family: train / held-out NMSE, seed-normalised held-out
                            MSE, final training loss (mean of the last steps)
    family_curves.parquet   the per-step training loss of every fit
    percent_linear.parquet  per layer: alive, dead, % linear at τ in the seed form (with the
                            per-layer norms) and in the fvu form, and the norms used
    sweep.parquet           every layer's α sweep (held-out NMSE vs mean ‖w‖₁), chosen α
    summary.json            budgets, per-layer figures, timings
    *.png                   charts (training loss by family, % linear, α sweeps)

Embedded model, reduced budget:
    python analyses/replicate_seed.py --model smollm2-135m --layers 1,2 \
        --tokens 30000 --sae-tokens 100000 --run-root /tmp/replication-runs
Pythia with published SAEs (needs the Hugging Face hub; {layer} is the MLP layer, {prev}
the layer before it, whose block output is the residual stream a Pythia MLP reads):
    python analyses/replicate_seed.py --model EleutherAI/pythia-70m-deduped --layers 1-5 \
        --sae-in-template 'hf://EleutherAI/sae-pythia-70m-deduped-32k/layers.{prev}' \
        --sae-out-template 'hf://EleutherAI/sae-pythia-70m-deduped-32k/layers.{layer}.mlp'
Pythia with the seed's own SAEs (jbrinkma/Pythia-70M-deduped-SAEs, needs the hub): the
seed's model, layers 1–5, the seed's figures printed beside coact's:
    python analyses/replicate_seed.py --published seed --corpus NeelNanda/pile-10k --device cuda
`--published marks` uses saprmarks/pythia-70m-deduped-saes (the 10_32768 set) instead.
Bad input (unknown model, bad layer list, missing SAE, ...) prints one error line, exit 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress is printed per layer, not by bars

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import polars as pl
import torch

from coact.codes.store import CodeStore
from coact.connectors.config import MLP_FIT, ConnectConfig
from coact.connectors.stage import ConnectResult
from coact.connectors.train import ConnectorTrainConfig, train_connector
from coact.errors import CoactError
from coact.linearity.table import LinearityConfig, percent_linear, relabel, seed_scale
from coact.models.load import load_model
from coact.models.sites import SitePair
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.run import analyze
from coact.pipeline.summary import RunSummary
from coact.rundir.files import atomic_write
from coact.rundir.layout import RunLayout
from coact.sae.formats import load_sae
from coact.sae.train import SaeTrainConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "analyses" / "results" / "replication"
FAMILIES = ("linear", "relu", "mlp", "two-relu")
SEED_MODEL = "eleutherai/pythia-70m-deduped"
SEED_PERCENT = {1: 78.8, 2: 95.9, 3: 97.8, 4: 98.0, 5: 98.9}  # τ = 0.001, seed form, alive
SEED_TAU = 0.001
SENSITIVITY_TAUS = (1e-4, 1e-3, 1e-2)
# Published SAEs for the seed's model, by hub id: (mlp_resid template, mlp_out template).
# A Pythia MLP reads the residual stream entering its block, block {prev}'s output.
_SEED_REPO = "hf://jbrinkma/Pythia-70M-deduped-SAEs/Pythia-70M-deduped"
_MARKS_ZIP = (
    "hf://saprmarks/pythia-70m-deduped-saes/dictionaries_pythia-70m-deduped_10.zip"
    "/dictionaries/pythia-70m-deduped"
)
PUBLISHED = {
    "seed": (f"{_SEED_REPO}-res-{{prev}}.pt", f"{_SEED_REPO}-mlp-{{layer}}.pt"),
    "marks": (
        f"{_MARKS_ZIP}/resid_out_layer{{prev}}/10_32768",
        f"{_MARKS_ZIP}/mlp_out_layer{{layer}}/10_32768",
    ),
}


def model_slug(model: str) -> str:
    """The same slug `AnalyzeConfig.resolved_run_dir` uses for run directories."""
    return model.strip("/").replace("/", "--").replace(".", "_")


def is_seed_model(model: str) -> bool:
    return model.strip("/").lower() == SEED_MODEL


def seed_reference_line(layers: list[int]) -> str:
    """The seed's figures for `layers`, e.g. 'layer 1 78.8 %, layer 2 95.9 %'."""
    known = [f"layer {ell} {SEED_PERCENT[ell]:.1f} %" for ell in layers if ell in SEED_PERCENT]
    return ", ".join(known) or "none for these layers (the seed reports layers 1-5)"


def apply_published(args: argparse.Namespace) -> argparse.Namespace:
    """`--published seed|marks`: the seed's model, its layers 1–5 and those SAEs' templates,
    unless the command line names a model, layers or templates itself."""
    if args.published is None:
        return args
    sae_in, sae_out = PUBLISHED[args.published]
    return argparse.Namespace(
        **{
            **vars(args),
            "model": args.model or "EleutherAI/pythia-70m-deduped",
            "layers": args.layers or "1-5",
            "sae_in_template": args.sae_in_template or sae_in,
            "sae_out_template": args.sae_out_template or sae_out,
        }
    )


def parse_layers(text: str) -> list[int]:
    """'1,2', '1-5' or '1-3,5' → sorted distinct layers; anything else is a CoactError."""
    layers: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        try:
            if "-" in part[1:]:
                lo, hi = (int(v) for v in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise CoactError(
                f"bad layer list {text!r}: write layers as e.g. '1,2' or '1-5' "
                "(non-negative integers)"
            ) from None
    if not layers or min(layers) < 0:
        raise CoactError(f"bad layer list {text!r}: layers must be non-negative integers")
    return sorted(layers)


# --- SAEs given by templates ---------------------------------------------------------------


def sae_source(template: str | None, layer: int) -> str | None:
    """Fill {layer} (the MLP layer) and {prev} (layer − 1) in an SAE template."""
    if template is None:
        return None
    if "{prev}" in template and layer == 0:
        raise CoactError(f"SAE template {template!r} uses {{prev}}, which layer 0 does not have")
    try:
        return template.format(layer=layer, prev=layer - 1)
    except (KeyError, IndexError, ValueError) as error:
        raise CoactError(
            f"bad SAE template {template!r} ({error}); only {{layer}} and {{prev}} are filled"
        ) from None


# --- per-layer measurements ------------------------------------------------------------------


@torch.no_grad()
def output_norm(sae_path: str, codes: Any, n_tokens: int, seed: int, device: str) -> float:
    """Mean ‖SAE.decode(codes)‖ over up to `n_tokens` stored tokens (the layer's norm)."""
    sae = load_sae(sae_path, device=device)
    rows = np.sort(np.random.default_rng(seed).permutation(codes.shape[0])[:n_tokens])
    total, count = 0.0, 0
    for start in range(0, len(rows), 512):
        part = codes[rows[start : start + 512]].toarray()
        decoded = sae.decode(torch.from_numpy(part).float().to(device))
        total += float(decoded.norm(dim=-1).double().sum())
        count += part.shape[0]
    if count == 0:
        raise CoactError("no stored tokens to estimate the layer's output norm from")
    return total / count


@dataclass
class LayerResult:
    layer: int
    summary: RunSummary
    seed_model: bool  # the seed's own model: its percentages are the reference
    norm: float = float("nan")
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def layout(self) -> RunLayout:
        return RunLayout.of(self.summary.run_dir)

    @property
    def connect(self) -> ConnectResult:
        if self.summary.connect is None:
            raise CoactError(f"layer {self.layer}: the run has no connect result")
        return self.summary.connect


def run_analyze(args: argparse.Namespace, layer: int, run_root: Path) -> RunSummary:
    slug = model_slug(args.model)
    run_dir = run_root / f"{slug}-L{layer}"
    sae_in = sae_source(args.sae_in_template, layer)
    sae_out = sae_source(args.sae_out_template, layer)
    train = SaeTrainConfig(
        expansion=args.sae_expansion, k=args.sae_k, seed=args.seed
    )  # used only for SAEs not given by a template
    config = AnalyzeConfig(
        model=args.model,
        layer=layer,
        corpus=args.corpus,
        tokens=args.tokens,
        sae_tokens=args.sae_tokens,
        ctx_len=args.ctx_len,
        seed=args.seed,
        device=args.device,
        run_dir=str(run_dir),
        sae_in=sae_in,
        sae_out=sae_out,
        sae=train,
        connect=ConnectConfig(
            progress=False,
            mlp=replace(MLP_FIT, hidden=args.linearity_hidden, epochs=args.linearity_epochs),
            linearity=LinearityConfig(tau=args.tau, form="seed"),
        ),
    )
    if not args.calibrate:
        config = config.with_stages(drop=("calibrate",))
    summary = analyze(config)
    assert isinstance(summary, RunSummary)  # one layer, not a model run
    return summary


def fit_families(
    args: argparse.Namespace, result: LayerResult, min_norm: float
) -> tuple[list[dict[str, Any]], list[pl.DataFrame]]:
    store = CodeStore.open(result.layout.codes)
    layer = result.layer
    in_slug, out_slug = SitePair.mlp(layer).slugs
    x, y = store.read_site(in_slug), store.read_site(out_slug)
    groups = store.read_tokens()["context"].to_numpy()
    rows, curves = [], []
    for family in FAMILIES:
        t0 = time.perf_counter()
        fit = train_connector(
            x,
            y,
            ConnectorTrainConfig(
                family=family,
                bias=not args.no_bias,
                hidden=args.hidden,
                lr=args.lr,
                epochs=args.epochs,
                batch_tokens=args.batch_tokens,
                seed=args.seed,
                device=args.device,
                layer_norm=result.norm,
                min_layer_norm=min_norm,
                progress=False,
            ),
            groups=groups,
        )
        seconds = time.perf_counter() - t0
        losses = np.asarray(fit.loss_nmse, dtype=float)
        tail = losses[-max(1, min(args.final_steps, len(losses))) :]
        rows.append(
            {
                "layer": layer,
                "family": family,
                "hidden": args.hidden if family in ("mlp", "two-relu") else None,
                "steps": len(losses),
                "train_nmse": fit.train_nmse_total,
                "heldout_nmse": fit.heldout_nmse_total,
                "heldout_seed_mse": fit.heldout_seed_mse_total,
                "final_loss": float(tail.mean()) if len(tail) else float("nan"),
                "seconds": seconds,
            }
        )
        curves.append(
            pl.DataFrame(
                {
                    "layer": np.full(len(losses), layer),
                    "family": [family] * len(losses),
                    "step": np.arange(len(losses)),
                    "nmse": losses,
                }
            )
        )
        print(
            f"  layer {layer} {family:8s}: train NMSE {fit.train_nmse_total:.4f}, "
            f"held-out NMSE {fit.heldout_nmse_total:.4f} ({seconds:.0f} s)",
            flush=True,
        )
    return rows, curves


def linearity_rows(result: LayerResult, min_norm: float, tau: float) -> tuple[dict, dict]:
    """% linear in the seed form (with this layer's norm) and in the fvu form, by relabelling
    the connect stage's per-feature table (no refitting)."""
    table = pl.read_parquet(result.layout.connect.features)
    scale = seed_scale(result.norm, min_norm)
    table = table.with_columns((pl.col("d") * scale).alias("d_seed"))
    seed = percent_linear(relabel(table, LinearityConfig(tau=tau, form="seed")))
    fvu = percent_linear(relabel(table, LinearityConfig(tau=tau, form="fvu")))
    raw = percent_linear(relabel(table, LinearityConfig(tau=tau, form="raw")))
    reference = SEED_PERCENT.get(result.layer) if result.seed_model else None
    row = {
        "layer": result.layer,
        "alive": seed.alive,
        "dead": seed.dead,
        "tau": tau,
        "linear_seed": seed.linear,
        "percent_linear_seed": seed.percent_linear,
        "linear_fvu": fvu.linear,
        "percent_linear_fvu": fvu.percent_linear,
        "percent_linear_raw": raw.percent_linear,
        "layer_norm": result.norm,
        "min_layer_norm": min_norm,
        "seed_scale": scale,
        "seed_reference_percent": reference,
    }
    sensitivity = {
        form: {
            f"{t:g}": percent_linear(
                relabel(table, LinearityConfig(tau=t, form=form))
            ).percent_linear
            for t in SENSITIVITY_TAUS
        }
        for form in ("seed", "fvu")
    }
    return row, sensitivity


# --- charts ----------------------------------------------------------------------------------


def chart_families(families: pl.DataFrame, model: str, epochs: int, hidden: int) -> alt.Chart:
    data = families.select("layer", "family", "final_loss", "heldout_nmse").to_pandas()
    return (
        alt.Chart(data)
        .mark_bar()
        .encode(
            x=alt.X("layer:O", title="MLP layer", axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("family:N", sort=list(FAMILIES)),
            y=alt.Y(
                "final_loss:Q",
                title="final training loss (normalised MSE, fraction of variance)",
            ),
            color=alt.Color("family:N", sort=list(FAMILIES), title="connector family"),
            tooltip=["layer", "family", "final_loss", "heldout_nmse"],
        )
        .properties(
            width=110 * max(1, families["layer"].n_unique()),
            height=260,
            title=alt.TitleParams(
                f"{model}: training loss of each connector family, by MLP layer",
                subtitle=f"no L1; {epochs} epochs; hidden {hidden} for mlp and two-relu; "
                "mean of the last training steps",
            ),
        )
    )


def chart_percent(percent: pl.DataFrame, model: str, tau: float) -> alt.Chart:
    series = [
        ("measured, seed form", "percent_linear_seed"),
        ("measured, fvu form", "percent_linear_fvu"),
    ]
    frames = [
        percent.select("layer", pl.col(column).alias("percent"), pl.lit(name).alias("series"))
        for name, column in series
    ]
    if percent["seed_reference_percent"].is_not_null().any():
        frames.append(
            percent.filter(pl.col("seed_reference_percent").is_not_null()).select(
                "layer",
                pl.col("seed_reference_percent").cast(pl.Float64).alias("percent"),
                pl.lit("seed paper (reference)").alias("series"),
            )
        )
    data = pl.concat(frames).to_pandas()
    order = [name for name, _ in series] + ["seed paper (reference)"]
    return (
        alt.Chart(data)
        .mark_bar()
        .encode(
            x=alt.X("layer:O", title="MLP layer", axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("series:N", sort=order),
            y=alt.Y(
                "percent:Q",
                title="alive MLP-output features that are linear (%)",
                scale=alt.Scale(domain=[0, 100]),
            ),
            color=alt.Color(
                "series:N",
                title=None,
                scale=alt.Scale(domain=order, range=["#4c78a8", "#f58518", "#9d9d9d"]),
            ),
            tooltip=["layer", "series", alt.Tooltip("percent:Q", format=".1f")],
        )
        .properties(
            width=110 * max(1, percent["layer"].n_unique()),
            height=260,
            title=alt.TitleParams(
                f"{model}: share of MLP-output features computed linearly (τ = {tau:g})",
                subtitle="linear: held-out MSE(linear) − MSE(mlp) ≤ τ; dead features excluded",
            ),
        )
    )


def chart_sweep(sweep: pl.DataFrame, model: str) -> alt.TopLevelMixin:
    data = sweep.select("layer", "alpha", "mean_l1", "heldout_nmse", "chosen").to_pandas()
    data["label"] = [f"α = {a:.3g}" for a in data["alpha"]]
    base = alt.Chart(data).encode(
        x=alt.X("mean_l1:Q", title="mean ‖w‖₁ per alive output feature (code units)"),
        y=alt.Y(
            "heldout_nmse:Q",
            title="held-out NMSE (fraction of variance)",
            scale=alt.Scale(zero=False),
        ),
        color=alt.Color("layer:N", title="MLP layer"),
        tooltip=["layer", "alpha", "mean_l1", "heldout_nmse"],
    )
    chosen = base.transform_filter("datum.chosen")
    return alt.layer(
        base.mark_line(point=True),
        chosen.mark_point(size=220, shape="diamond", filled=False, strokeWidth=2),
        chosen.mark_text(align="left", dx=10, dy=-8).encode(text="label:N"),
    ).properties(
        width=420,
        height=280,
        title=alt.TitleParams(
            f"{model}: L1 path of the sparse linear connector, one line per layer",
            subtitle="each point one α of the grid; the diamond marks the α chosen at the elbow",
        ),
    )


# --- output --------------------------------------------------------------------------------


def write_parquet(path: Path, frame: pl.DataFrame) -> None:
    atomic_write(path, frame.write_parquet)


def write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def print_tables(percent: pl.DataFrame, families: pl.DataFrame, tau: float) -> None:
    print(f"\nPercent of alive MLP-output features that are linear (τ = {tau:g})")
    head = (
        f"{'layer':>5} {'alive':>6} {'dead':>5} {'seed form':>10} {'fvu form':>9} "
        f"{'seed paper':>10} {'layer norm':>10} {'scale':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in percent.iter_rows(named=True):
        ref = r["seed_reference_percent"]
        print(
            f"{r['layer']:>5} {r['alive']:>6} {r['dead']:>5} "
            f"{r['percent_linear_seed']:>9.1f}% {r['percent_linear_fvu']:>8.1f}% "
            f"{(f'{ref:.1f}%' if ref is not None else '—'):>10} "
            f"{r['layer_norm']:>10.3f} {r['seed_scale']:>7.3f}"
        )
    print("\nConnector families without L1 (NMSE: fraction of variance unexplained)")
    head = (
        f"{'layer':>5} {'family':>9} {'final loss':>10} {'train NMSE':>10} "
        f"{'held-out NMSE':>13} {'held-out seed MSE':>17}"
    )
    print(head)
    print("-" * len(head))
    for r in families.iter_rows(named=True):
        print(
            f"{r['layer']:>5} {r['family']:>9} {r['final_loss']:>10.4f} "
            f"{r['train_nmse']:>10.4f} {r['heldout_nmse']:>13.4f} "
            f"{r['heldout_seed_mse']:>17.3e}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", default=None, help="model (see coact analyze); smollm2-135m if unset"
    )
    parser.add_argument("--layers", default=None, help="MLP layers, e.g. 1,2 or 1-5; 1,2 if unset")
    parser.add_argument(
        "--published",
        choices=sorted(PUBLISHED),
        default=None,
        help="published SAEs on the seed's model: seed (jbrinkma/Pythia-70M-deduped-SAEs) "
        "or marks (saprmarks/pythia-70m-deduped-saes); sets model, layers 1-5, templates",
    )
    parser.add_argument("--corpus", default="embedded", help="corpus (see coact analyze)")
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens of stored codes")
    parser.add_argument(
        "--sae-tokens", type=int, default=400_000, help="tokens each trained SAE sees"
    )
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--sae-in-template",
        default=None,
        help="SAE for mlp_resid[layer] ({layer}, {prev} = layer-1 are filled); trained if unset",
    )
    parser.add_argument(
        "--sae-out-template",
        default=None,
        help="SAE for mlp_out[layer] ({layer}, {prev} are filled); trained if unset",
    )
    parser.add_argument(
        "--sae-expansion", type=int, default=4, help="trained SAEs: width = expansion × d_model"
    )
    parser.add_argument("--sae-k", type=int, default=32, help="trained SAEs: TopK k")
    parser.add_argument("--epochs", type=int, default=2, help="family fits: epochs")
    parser.add_argument(
        "--hidden", type=int, default=1024, help="family fits: hidden units (mlp, two-relu)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="family fits: Adam lr")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="family fits: batch")
    parser.add_argument("--no-bias", action="store_true", help="family fits without biases")
    parser.add_argument(
        "--final-steps", type=int, default=20, help="final training loss: mean of these steps"
    )
    parser.add_argument("--tau", type=float, default=SEED_TAU, help="linearity threshold")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="also calibrate τ per layer against the model's loss (coact calibrate)",
    )
    parser.add_argument(
        "--linearity-epochs",
        type=int,
        default=MLP_FIT.epochs,
        help="linearity test (connect stage): epochs of the mlp that starts from least squares",
    )
    parser.add_argument(
        "--linearity-hidden",
        type=int,
        default=MLP_FIT.hidden,
        help="linearity test (connect stage): hidden units of that mlp",
    )
    parser.add_argument(
        "--norm-tokens", type=int, default=4096, help="tokens for each layer's output norm"
    )
    parser.add_argument(
        "--run-root", default="runs", help="run directories go to RUN_ROOT/<model>-L<layer>"
    )
    parser.add_argument(
        "--results-root", default=str(RESULTS), help="results go to RESULTS_ROOT/<model-slug>"
    )
    args = apply_published(parser.parse_args(argv))
    args.model = args.model or "smollm2-135m"
    args.layers = args.layers or "1,2"
    return args


def check_numbers(args: argparse.Namespace) -> None:
    positive = {
        "--tokens": args.tokens,
        "--sae-tokens": args.sae_tokens,
        "--ctx-len": args.ctx_len - 1,
        "--sae-expansion": args.sae_expansion,
        "--sae-k": args.sae_k,
        "--epochs": args.epochs,
        "--hidden": args.hidden,
        "--batch-tokens": args.batch_tokens,
        "--final-steps": args.final_steps,
        "--norm-tokens": args.norm_tokens,
        "--linearity-epochs": args.linearity_epochs,
        "--linearity-hidden": args.linearity_hidden,
    }
    for flag, value in positive.items():
        if value <= 0:
            least = "at least 2" if flag == "--ctx-len" else "positive"
            raise CoactError(f"{flag} must be {least}")
    if not (args.lr > 0 and args.tau >= 0):
        raise CoactError("--lr must be positive and --tau non-negative")


def check_model(args: argparse.Namespace, layers: list[int]) -> str:
    """Stop on template mistakes, layers the model lacks and a k wider than the trained
    SAEs before any work is done; return the model's name."""
    for layer in layers:
        sae_source(args.sae_in_template, layer)
        sae_source(args.sae_out_template, layer)
    print(f"loading {args.model} to check layers {layers} ...", flush=True)
    lm = load_model(args.model, device="cpu", seed=args.seed)
    for layer in layers:
        pair = SitePair.mlp(layer)
        for site in (pair.in_site, pair.out_site):
            lm.adapter.check(site)
    width = args.sae_expansion * lm.adapter.d_model
    if not (args.sae_in_template and args.sae_out_template) and args.sae_k > width:
        raise CoactError(f"--sae-k {args.sae_k} exceeds the trained SAEs' width {width}")
    return lm.name


def analyze_layer(
    args: argparse.Namespace, layer: int, run_root: Path, seed_model: bool
) -> LayerResult:
    """The layer's run (SAEs, codes, L1 path, linearity) and its output norm."""
    t0 = time.perf_counter()
    result = LayerResult(layer, run_analyze(args, layer, run_root), seed_model)
    result.seconds["analyze_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_site = SitePair.mlp(layer).out_site
    codes = CodeStore.open(result.layout.codes).read_site(out_site.slug)
    sae_out = result.summary.sites[str(out_site)].sae
    result.norm = output_norm(sae_out, codes, args.norm_tokens, args.seed, args.device)
    result.seconds["norm_s"] = time.perf_counter() - t0
    c = result.connect
    print(
        f"  layer {layer}: {c.share.alive} alive / {c.share.dead} dead output features, "
        f"chosen α {c.alpha:.3g}, held-out NMSE linear {c.heldout_nmse_linear:.4f} "
        f"vs mlp {c.heldout_nmse_mlp:.4f}, output norm {result.norm:.3f} "
        f"({result.seconds['analyze_s']:.0f} s)",
        flush=True,
    )
    return result


@dataclass
class Tables:
    """What the layers give together: family fits, % linear, τ sensitivity, α sweeps."""

    families: pl.DataFrame
    curves: pl.DataFrame
    percent: pl.DataFrame
    sweep: pl.DataFrame
    sensitivity: dict[str, Any]


def layer_tables(args: argparse.Namespace, results: list[LayerResult], min_norm: float) -> Tables:
    family_rows: list[dict[str, Any]] = []
    curves: list[pl.DataFrame] = []
    percent_rows, sensitivity, sweeps = [], {}, []
    for i, result in enumerate(results, 1):
        print(
            f"[{i}/{len(results)}] layer {result.layer}: four connector families, no L1, "
            f"{args.epochs} epochs",
            flush=True,
        )
        t0 = time.perf_counter()
        rows, layer_curves = fit_families(args, result, min_norm)
        result.seconds["families_s"] = time.perf_counter() - t0
        family_rows += rows
        curves += layer_curves
        row, sens = linearity_rows(result, min_norm, args.tau)
        percent_rows.append(row)
        sensitivity[str(result.layer)] = sens
        sweep = pl.read_parquet(result.layout.connect.sweep)
        sweeps.append(
            sweep.with_columns(
                pl.lit(result.layer, dtype=pl.Int64).alias("layer"),
                pl.lit(result.connect.alpha).alias("chosen_alpha"),
            ).select("layer", pl.all().exclude("layer"))
        )
    return Tables(
        families=pl.DataFrame(family_rows),
        curves=pl.concat(curves),
        percent=pl.DataFrame(percent_rows, schema_overrides={"seed_reference_percent": pl.Float64}),
        sweep=pl.concat(sweeps),
        sensitivity=sensitivity,
    )


def write_tables(out: Path, tables: Tables, model_name: str, args: argparse.Namespace) -> list[str]:
    """The parquet tables and the charts; returns the charts' file names."""
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(out / "families.parquet", tables.families)
    write_parquet(out / "family_curves.parquet", tables.curves)
    write_parquet(out / "percent_linear.parquet", tables.percent)
    write_parquet(out / "sweep.parquet", tables.sweep)
    charts = {
        "families.png": chart_families(tables.families, model_name, args.epochs, args.hidden),
        "percent_linear.png": chart_percent(tables.percent, model_name, args.tau),
        "sweep.png": chart_sweep(tables.sweep, model_name),
    }
    for name, chart in charts.items():
        chart.save(str(out / name), scale_factor=2)
    return sorted(charts)


def budgets(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "corpus": args.corpus,
        "tokens": args.tokens,
        "sae_tokens": args.sae_tokens,
        "ctx_len": args.ctx_len,
        "seed": args.seed,
        "device": args.device,
        "published": args.published,
        "sae_in_template": args.sae_in_template,
        "sae_out_template": args.sae_out_template,
        "sae_expansion": args.sae_expansion,
        "sae_k": args.sae_k,
        "family_epochs": args.epochs,
        "family_hidden": args.hidden,
        "family_lr": args.lr,
        "family_batch_tokens": args.batch_tokens,
        "family_bias": not args.no_bias,
        "final_loss_steps": args.final_steps,
        "tau": args.tau,
        "linearity_mlp_epochs": args.linearity_epochs,
        "linearity_mlp_hidden": args.linearity_hidden,
        "norm_tokens": args.norm_tokens,
    }


def connect_detail(connect: ConnectResult) -> dict[str, Any]:
    """The connect headline as this script has always written it: flat, the linear share's
    figures beside the fit's, without the directory."""
    detail: dict[str, Any] = {}
    for key, value in connect.to_dict().items():
        if key == "share":
            detail.update(value)
        elif key != "directory":
            detail[key] = value
    return detail


def layer_detail(result: LayerResult, sensitivity: dict[str, Any]) -> dict[str, Any]:
    summary = result.summary
    saes = ("sae", "width", "fve", "l0", "dead_fraction", "ce_recovered")
    return {
        "run_dir": summary.run_dir,
        "tokens": summary.tokens,
        "layer_norm": result.norm,
        "saes": {
            site: {k: getattr(info, k, None) for k in saes} for site, info in summary.sites.items()
        },
        "connect": connect_detail(result.connect),
        "tau_sensitivity": sensitivity,
        "calibrate": summary.calibrate.to_dict() if summary.calibrate else None,
        "logic": summary.logic.counts if summary.logic else None,
        "seconds": result.seconds,
    }


def replicate(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    check_numbers(args)
    layers = parse_layers(args.layers)
    run_root = Path(args.run_root)
    out = Path(args.results_root) / model_slug(args.model)
    seed_model = is_seed_model(args.model)
    if seed_model:
        print("seed study, % linear: " + seed_reference_line(layers), flush=True)
    model_name = check_model(args, layers)

    results: list[LayerResult] = []
    for i, layer in enumerate(layers, 1):
        print(f"[{i}/{len(layers)}] layer {layer}: SAEs, codes, L1 path, linearity", flush=True)
        results.append(analyze_layer(args, layer, run_root, seed_model))
    min_norm = min(r.norm for r in results)
    tables = layer_tables(args, results, min_norm)
    charts = write_tables(out, tables, model_name, args)

    summary = {
        "model": model_name,
        "layers": layers,
        "seed_reference": SEED_PERCENT if seed_model else None,
        "budgets": budgets(args),
        "min_layer_norm": min_norm,
        "layers_detail": {
            str(r.layer): layer_detail(r, tables.sensitivity[str(r.layer)]) for r in results
        },
        "percent_linear": tables.percent.to_dicts(),
        "families": tables.families.to_dicts(),
        "charts": charts,
        "runtime_s": time.perf_counter() - started,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    write_json(out / "summary.json", summary)
    print_tables(tables.percent, tables.families, args.tau)
    print(f"\nwrote {out} in {summary['runtime_s']:.0f} s", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        replicate(args)
    except CoactError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
