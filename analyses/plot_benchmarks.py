"""Benchmark figures for docs/benchmarks.md: reads analyses/results/bench_*.json and writes
one SVG per figure into docs/figures/ (altair charts drawn offline by vl-convert).

Run `python analyses/plot_benchmarks.py` (a few seconds; `just docs` runs it before the
build). A figure whose results file is missing is left as it is, with a note. Every chart
has a title, axis titles with units, and a one-line "Read:" caption in benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import altair as alt
import vl_convert

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "analyses" / "results"
FIGURES = ROOT / "docs" / "figures"
WIDTH = 460
MODEL_NAMES = {
    "smollm2-135m": "SmolLM2-135M (real weights)",
    "pythia-70m-shaped-random": "Pythia-70m-shaped (random weights)",
}
LABELS = ["WEIGHTED-SUM", "OR", "AND", "A-AND-NOT-B", "NONLINEAR", "UNEXPLAINED", "DEAD"]


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        print(f"plot_benchmarks: {path} missing, its figures are left as they are")
        return None
    return dict(json.loads(path.read_text()))


def _title(text: str, subtitle: str) -> alt.TitleParams:
    return alt.TitleParams(text, subtitle=subtitle, anchor="start")


def _target(value: float, axis: str, label: str) -> alt.LayerChart | alt.Chart:
    """A dashed rule at a target, labelled."""
    base = alt.Chart(alt.Data(values=[{"v": value, "label": label}]))
    if axis == "x":
        rule = base.mark_rule(strokeDash=[4, 3], color="#d62728").encode(x="v:Q")
        text = base.mark_text(align="left", dx=4, dy=-6, color="#d62728").encode(
            x="v:Q", y=alt.value(0), text="label:N"
        )
    else:
        rule = base.mark_rule(strokeDash=[4, 3], color="#d62728").encode(y="v:Q")
        text = base.mark_text(align="right", dy=-6, color="#d62728").encode(
            y="v:Q", x=alt.value(WIDTH), text="label:N"
        )
    return rule + text


def _blocks(runs: list[dict[str, Any]]) -> str:
    """Which blocks' MLP sites the runs read: 'block 3', or every block in one pass."""
    layers = [run.get("layers", [run["layer"]]) for run in runs]
    if all(len(each) == 1 for each in layers):
        return f"block {layers[0][0]}"
    return (
        "every block's two MLP sites in one pass ("
        + " and ".join(str(len(each)) for each in layers)
        + " blocks)"
    )


COLLECT_VARIANTS = {
    "capture": "nnsight capture",
    "collect_float32": "collect, float32 encoders",
    "collect": "collect, bfloat16 screen (default)",
}


def _collect_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """A bar per variant, with its 95 % interval over slices where the run has one."""
    model = MODEL_NAMES.get(run["model"], run["model"])
    intervals = run.get("ratio_vs_plain_ci95", {})
    return [
        {"model": model, "what": what, "ratio": run["ratio_vs_plain"][name]}
        | dict(zip(("low", "high"), intervals.get(name, ()), strict=False))
        for name, what in COLLECT_VARIANTS.items()
        if run["ratio_vs_plain"].get(name) is not None
    ]


def collect_throughput(results: dict[str, Any]) -> alt.TopLevelMixin:
    rows = [row for run in results["runs"] for row in _collect_rows(run)]
    bars = (
        alt.Chart(alt.Data(values=rows))
        .mark_bar()
        .encode(
            x=alt.X(
                "ratio:Q",
                title="throughput relative to the plain forward pass (×, tokens/s ÷ tokens/s)",
                scale=alt.Scale(domain=[0, 1.1]),
            ),
            y=alt.Y("what:N", title=None, sort=None),
            yOffset=alt.YOffset("model:N", sort=None),
            color=alt.Color(
                "model:N", title="model", legend=alt.Legend(orient="bottom", labelLimit=400)
            ),
            tooltip=["model:N", "what:N", alt.Tooltip("ratio:Q", format=".2f")],
        )
    )
    with_intervals = [row for row in rows if "low" in row]
    whiskers = (
        alt.Chart(alt.Data(values=with_intervals))
        .mark_rule(color="black")
        .encode(
            x="low:Q",
            x2="high:Q",
            y=alt.Y("what:N", sort=None),
            yOffset=alt.YOffset("model:N", sort=None),
        )
    )
    return (bars + whiskers + _target(0.9, "x", "target ≥ 0.9×")).properties(
        width=WIDTH,
        title=_title(
            "Collection throughput against a plain forward pass",
            f"{_blocks(results['runs'])}, {results['runs'][0]['tokens']:,} tokens, "
            f"{results['torch_threads']} "
            f"thread(s) on {results['cpu_count']} CPU cores, "
            f"{results['runs'][0]['repeats']} interleaved passes"
            + (", lines: 95 % intervals over slices" if with_intervals else ""),
        ),
    )


def store_size(results: dict[str, Any]) -> alt.TopLevelMixin:
    rows = []
    for run in results["runs"]:
        site = next(iter(run["store_bytes_per_token"].values()))
        for what, key in (
            ("stored", "stored"),
            ("ideal (nonzeros × 6 B)", "ideal"),
            ("dense float32", "dense_float32"),
        ):
            rows.append(
                {
                    "model": MODEL_NAMES.get(run["model"], run["model"]),
                    "what": what,
                    "bytes": site[key],
                }
            )
    base = alt.Chart(alt.Data(values=rows)).encode(
        x=alt.X(
            "bytes:Q",
            title="bytes per stored token of one site (B, log scale)",
            scale=alt.Scale(type="log", domain=[100, 20_000]),
        ),
        y=alt.Y("what:N", title=None, sort=None),
        yOffset=alt.YOffset("model:N", sort=None),
        color=alt.Color(
            "model:N", title="model", legend=alt.Legend(orient="bottom", labelLimit=400)
        ),
        tooltip=["model:N", "what:N", alt.Tooltip("bytes:Q", format=",.1f")],
    )
    dots = base.mark_point(filled=True, size=90)
    text = base.mark_text(align="left", dx=8).encode(text=alt.Text("bytes:Q", format=",.0f"))
    return (dots + text).properties(
        width=WIDTH,
        title=_title(
            "Feature-code store size per token",
            "one site at block 3; TopK SAEs, k = 32; int16 index + float32 value per nonzero",
        ),
    )


def exact_path(results: dict[str, Any]) -> alt.TopLevelMixin:
    part = results["exact_path_vs_sgd"]
    exact, sgd = part["exact"], part["sgd"]
    rows = [
        {"alpha": a, "nmse": n, "weights": w}
        for a, n, w in zip(
            exact["alphas"],
            exact["heldout_nmse_per_alpha"],
            exact["nonzero_weights_per_alpha"],
            strict=True,
        )
    ]
    point = [
        {
            "alpha": sgd["alpha_exact_units"],
            "nmse": part["heldout_nmse_at_sgd_alpha"]["sgd"],
            "what": f"one SGD fit ({sgd['seconds']:.1f} s)",
        }
    ]
    x = alt.X(
        "alpha:Q",
        title="L1 strength α (exact solver's units, log scale)",
        scale=alt.Scale(type="log", reverse=True),
    )
    path = (
        alt.Chart(alt.Data(values=rows))
        .mark_line(point=True)
        .encode(
            x=x,
            y=alt.Y(
                "nmse:Q",
                title="held-out NMSE (mean over outputs, 1 = predicting the mean)",
                scale=alt.Scale(zero=False),
            ),
            tooltip=[
                alt.Tooltip("alpha:Q", format=".3g"),
                alt.Tooltip("nmse:Q", format=".3f"),
                alt.Tooltip("weights:Q", title="non-zero weights", format=","),
            ],
        )
    )
    sgd_point = (
        alt.Chart(alt.Data(values=point))
        .mark_point(shape="diamond", size=140, filled=True, color="#d62728")
        .encode(x=x, y="nmse:Q", tooltip=["what:N", alt.Tooltip("nmse:Q", format=".3f")])
    )
    sgd_text = sgd_point.mark_text(align="left", dx=9, color="#d62728").encode(text="what:N")
    return (path + sgd_point + sgd_text).properties(
        width=WIDTH,
        title=_title(
            f"Exact L1 path ({exact['seconds']:.1f} s for {exact['n_alphas']} α) "
            "against one SGD fit",
            f"SmolLM2-135M block 3, {part['n_in']} → {part['n_out']} features, "
            f"{part['heldout_tokens']:,} held-out tokens",
        ),
    )


def sparse_steps(results: dict[str, Any]) -> alt.TopLevelMixin:
    rows = [
        {
            "cell": f"{c['family']}, {c['n_in']:,} inputs",
            "density": "1 %" if c["density_label"] == "1%" else "1.39 % (the codes')",
            "active": c["nonzeros_per_row"],
            "ratio": c["ratio_dense_over_sparse"],
            "sparse_ms": c["sparse"]["seconds_total"] * 1000,
            "dense_ms": c["dense"]["seconds_total"] * 1000,
        }
        for c in results["sparse_vs_dense_step"]["cells"]
    ]
    bars = (
        alt.Chart(alt.Data(values=rows))
        .mark_bar()
        .encode(
            x=alt.X("ratio:Q", title="dense step time ÷ sparse step time (×)"),
            y=alt.Y("cell:N", title=None, sort=None),
            yOffset=alt.YOffset("density:N", sort=None),
            color=alt.Color(
                "density:N",
                title="input density",
                legend=alt.Legend(orient="bottom", labelLimit=400),
            ),
            tooltip=[
                "cell:N",
                "density:N",
                alt.Tooltip("active:Q", title="active inputs per row"),
                alt.Tooltip("ratio:Q", format=".2f"),
                alt.Tooltip("sparse_ms:Q", title="sparse (ms)", format=".1f"),
                alt.Tooltip("dense_ms:Q", title="dense (ms)", format=".1f"),
            ],
        )
    )
    target = results["sparse_vs_dense_step"]["target"]["ratio"]
    return (bars + _target(target, "x", f"target ≥ {target:g}×")).properties(
        width=WIDTH,
        title=_title(
            "Sparse- against dense-input connector training steps",
            "batch 1024, 2304 outputs, mlp hidden 4096; median of 7 steps, 2 CPU cores",
        ),
    )


def calibrate_time(results: dict[str, Any]) -> alt.TopLevelMixin:
    names = {
        "noise_s": "noise curves",
        "splices_s": "splices",
        "causal_s": "causal check",
    }
    rows = [{"part": names.get(k, k), "seconds": v} for k, v in results["seconds_by_part"].items()]
    share = results["forward_share"]
    return (
        alt.Chart(alt.Data(values=rows))
        .mark_bar()
        .encode(
            x=alt.X("seconds:Q", title="wall-clock time (s, 2 CPU cores)"),
            y=alt.Y("part:N", title=None, sort=None),
            tooltip=["part:N", alt.Tooltip("seconds:Q", format=".1f")],
        )
        .properties(
            width=WIDTH,
            title=_title(
                f"Calibration time by part: {results['seconds_total']:.0f} s in all",
                f"SmolLM2-135M block {results['layer']}, {results['tokens']:,} held-out tokens; "
                f"{share:.0%} of the time inside the model's forward passes",
            ),
        )
    )


def logic_accuracy(results: dict[str, Any]) -> alt.TopLevelMixin:
    settings = {"default settings": results["planted"]["mean"]}
    settings["connector's inputs only (ablation)"] = results["planted"][
        "ablation_connector_inputs_only"
    ]["mean"]
    settings.update(results["stress"]["mean_over_seeds"])
    rows = [
        {"setting": name, "label": label, "accuracy": mean["per_class"][label]}
        for name, mean in settings.items()
        for label in LABELS
        if label in mean["per_class"]
    ]
    base = alt.Chart(alt.Data(values=rows)).encode(
        x=alt.X(
            "label:N",
            title="planted label (20 outputs each; 25 NONLINEAR, 10 UNEXPLAINED, 5 DEAD)",
            sort=LABELS,
            axis=alt.Axis(labelAngle=0),
        ),
        y=alt.Y("setting:N", title=None, sort=list(settings)),
    )
    cells = base.mark_rect().encode(
        color=alt.Color(
            "accuracy:Q",
            title="accuracy (share)",
            scale=alt.Scale(domain=[0, 1], scheme="blues"),
        ),
        tooltip=["setting:N", "label:N", alt.Tooltip("accuracy:Q", format=".2f")],
    )
    text = base.mark_text().encode(
        text=alt.Text("accuracy:Q", format=".2f"),
        color=alt.condition("datum.accuracy > 0.5", alt.value("white"), alt.value("black")),
    )
    return (cells + text).properties(
        width=560,
        title=_title(
            "Logic labels on planted circuits: accuracy per class",
            "mean over seeds 0–4; 50k tokens, 256 inputs, 100 outputs unless the row says",
        ),
    )


def logic_time(results: dict[str, Any]) -> alt.TopLevelMixin:
    timing = results["timing"]
    rows = [
        {
            "layer": "planted stand-in, 2304 → 2304",
            "seconds": timing["planted_layer"]["seconds"],
            "features": timing["planted_layer"]["alive_outputs"],
        },
        {
            "layer": "SmolLM2-135M layer 3, 2304 → 2304",
            "seconds": timing["smollm2_L3"]["seconds"],
            "features": timing["smollm2_L3"]["alive_outputs"],
        },
    ]
    bars = (
        alt.Chart(alt.Data(values=rows))
        .mark_bar()
        .encode(
            x=alt.X(
                "seconds:Q",
                title="time to label every alive output feature (s, 2 CPU cores)",
                scale=alt.Scale(domain=[0, 65]),
            ),
            y=alt.Y("layer:N", title=None, sort=None),
            tooltip=["layer:N", "features:Q", alt.Tooltip("seconds:Q", format=".1f")],
        )
    )
    target = results["targets"]["seconds_per_layer"]
    return (bars + _target(target, "x", f"target ≤ {target:g} s")).properties(
        width=WIDTH,
        title=_title(
            "Time to label a whole layer",
            "about 100,000 tokens, 32 active inputs per token; shared machine (pessimistic)",
        ),
    )


FIGURES_BY_RESULT: dict[str, dict[str, Callable[[dict[str, Any]], alt.TopLevelMixin]]] = {
    "bench_collect": {"collect-throughput": collect_throughput, "store-size": store_size},
    "bench_collect_all_layers": {"collect-throughput-all-layers": collect_throughput},
    "bench_connectors": {
        "connectors-exact-path": exact_path,
        "connectors-sparse-steps": sparse_steps,
    },
    "bench_calibrate": {"calibrate-time": calibrate_time},
    "bench_logic": {"logic-accuracy": logic_accuracy, "logic-time": logic_time},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIGURES, help="folder for the SVGs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = 0
    for result, figures in FIGURES_BY_RESULT.items():
        results = _load(result)
        if results is None:
            continue
        for name, make in figures.items():
            spec = make(results).configure_view(stroke=None).to_dict()
            svg = vl_convert.vegalite_to_svg(spec)
            (args.out / f"{name}.svg").write_text(svg, encoding="utf-8")
            written += 1
    print(f"plot_benchmarks: {written} figures in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
