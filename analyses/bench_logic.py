"""Logic labels: accuracy on planted circuits, and the time to label a whole layer.

Two measurements, both through the path real data takes (codes → sparse linear connector
fitted and its α chosen as `coact.connectors.stage` does → `coact.logic.label_layer`):
  planted   — `coact.logic.planted` circuits at the default settings, one run per seed: label
              accuracy per class (A-AND-NOT-B right only with the right negated input),
              the confusion matrix, and precision / recall / F1 of the labeller's inputs
              against the planted ones; the mean over seeds. Targets: accuracy ≥ 95 %,
              support F1 ≥ 0.95. An ablation labels from the connector's inputs alone
              (no pruning, no completion from co-activations). Accuracy per planted rule
              (`per_kind`) too: NONLINEAR is right only with the right kind.
  timing    — every output of a layer-sized problem labelled (2304 → 2304 features,
              100,000 tokens, ~32 active inputs per token; planted circuits of that size,
              so its accuracy is reported too), and, when `runs/smollm2-135m-L3` holds the
              codes and connect's weights table, the real SmolLM2 layer 3 (read only).
              Target: ≤ 60 s for all alive features on 2 CPU cores. The compiled kernels
              are loaded (numba cache) before the clock starts. The real layer is labelled
              as the stage does: contexts from the store, the jacobian stage's connections
              among the candidates when `jacobian/connections.parquet` is there; its coverage
              summary (labelled features whose inputs cover ≥ 80 % of their activation mass,
              the distribution of inputs needed for 80 %) is recorded. `--run` names the run
              directory (default runs/smollm2-135m-L3).

A stress section reruns the planted seeds at harder settings (fewer tokens, more noise,
wider magnitudes) to show where the labels give way; those rows are not targets.

Run `python analyses/bench_logic.py` (≈ 4 minutes on 2 cores); `--quick` runs two small
seeds and a 20,000-token layer and writes to the temporary directory unless --out is given.
Writes analyses/results/bench_logic.json and prints the tables as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numba
import numpy as np
import polars as pl

from coact.logic.config import LABELS, LogicConfig
from coact.logic.coverage import CoverageSummary
from coact.logic.layer import label_layer
from coact.logic.planted import PlantedConfig, connector_weights, planted_circuits, run_planted
from coact.models.sites import SitePair
from coact.rundir.layout import CodesFiles, RunLayout

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "smollm2-135m-L3"
SITES = SitePair.mlp(3).slugs  # ("mlp_resid.3", "mlp_out.3")
TARGET_ACCURACY, TARGET_F1, TARGET_SECONDS = 0.95, 0.95, 60.0
STRESS: dict[str, dict[str, Any]] = {  # changes to the default PlantedConfig
    "fewer tokens (20,000)": {"n_tokens": 20_000},
    "noisier (noise 0.2, background 2e-3)": {"noise": 0.2, "background_rate": 2e-3},
    "wider magnitudes (σ 0.4)": {"magnitude_sigma": 0.4},
}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _layer_config(n_tokens: int, width: int, seed: int) -> PlantedConfig:
    """Planted circuits as wide as a layer: outputs split over the rules like the default."""
    base = PlantedConfig()
    share = width / base.n_outputs
    counts = {
        name: round(getattr(base, name) * share)
        for name in ("n_sum", "n_or", "n_and", "n_and_not", "n_nonlinear", "n_unexplained")
    }
    counts["n_dead"] = width - sum(counts.values())
    return PlantedConfig(n_tokens=n_tokens, n_inputs=width, seed=seed, **counts)


def planted(seeds: list[int], config: PlantedConfig, logic: LogicConfig) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        began = time.perf_counter()
        _, labels, score, info = run_planted(replace(config, seed=seed), logic)
        runs.append({"seed": seed, **score.as_dict(), "connector": info,
                     "mean_confidence": float(labels.features["confidence"].mean()),  # type: ignore[arg-type]
                     "seconds": time.perf_counter() - began})  # fmt: skip
        print(
            f"  seed {seed}: accuracy {score.accuracy:.3f}, support F1 {score.f1:.3f} "
            f"({time.perf_counter() - began:.1f} s)",
            flush=True,
        )
    kinds = sorted({k for r in runs for k in r["per_kind"]})
    mean: dict[str, Any] = {
        "accuracy": float(np.mean([r["accuracy"] for r in runs])),
        "per_kind": {
            k: float(np.mean([r["per_kind"][k] for r in runs if k in r["per_kind"]])) for k in kinds
        },
        "worst_per_class": {
            c: float(min(r["per_class"][c] for r in runs if c in r["per_class"])) for c in LABELS
        },
        "per_class": {
            c: float(np.mean([r["per_class"][c] for r in runs if c in r["per_class"]]))
            for c in LABELS
        },
        "support": {
            k: float(np.mean([r["support"][k] for r in runs]))
            for k in ("precision", "recall", "f1")
        },
        "worst_accuracy": float(min(r["accuracy"] for r in runs)),
        "worst_f1": float(min(r["support"]["f1"] for r in runs)),
    }
    confusion = {
        t: {p: int(sum(r["confusion"].get(t, {}).get(p, 0) for r in runs)) for p in LABELS}
        for t in LABELS
    }
    meets = mean["worst_accuracy"] >= TARGET_ACCURACY and mean["worst_f1"] >= TARGET_F1
    meets &= min(mean["worst_per_class"].values()) >= TARGET_ACCURACY  # every class, every seed
    return {
        "config": asdict(config),
        "seeds": seeds,
        "runs": runs,
        "mean": mean,
        "confusion_summed_over_seeds": confusion,
        "meets_targets_every_seed": meets,
    }


def _time_labels(
    x: Any, y: Any, weights: pl.DataFrame, logic: LogicConfig, contexts: Any = None,
    jacobian: pl.DataFrame | None = None,
) -> dict[str, Any]:  # fmt: skip
    alive = int((np.diff(y.tocsc().indptr) > 0).sum())
    cpu, began = _cpu_seconds(), time.perf_counter()
    labels = label_layer(x, y, weights, logic, progress=False, contexts=contexts, jacobian=jacobian)
    wall = time.perf_counter() - began
    cpu_used = _cpu_seconds() - cpu
    features = labels.features
    return {
        "tokens": int(x.shape[0]),
        "n_in": int(x.shape[1]),
        "n_out": int(y.shape[1]),
        "active_inputs_per_token": float(x.nnz / x.shape[0]),
        "alive_outputs": alive,
        "seconds": wall,
        "features_per_second": y.shape[1] / wall,
        "cpu_seconds": cpu_used,
        "own_cores_used": cpu_used / wall,
        "load_average_1min_after": os.getloadavg()[0],
        "meets_target": wall <= TARGET_SECONDS,
        "labels": dict(features["label"].value_counts().iter_rows()),
        "rules": dict(features["rule"].value_counts().iter_rows()),
        "mean_confidence": float(features["confidence"].mean()),  # type: ignore[arg-type]
        "cluster_rows": labels.clusters.height,
        "coverage": asdict(CoverageSummary.of(features, logic)),
        "_features": features,
    }


def timing(
    n_tokens: int, width: int, logic: LogicConfig, real: bool, run: Path = RUN
) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    config = _layer_config(n_tokens, width, seed=0)
    circuits = planted_circuits(config)
    began = time.perf_counter()
    weights, info = connector_weights(circuits.x, circuits.y, circuits.context_ids)
    fit_s = time.perf_counter() - began
    result = _time_labels(circuits.x, circuits.y, weights, logic, circuits.context_ids)
    from coact.logic.planted import score_labels

    score = score_labels(circuits, result.pop("_features"))
    out["planted_layer"] = {
        **result, "connector_seconds": fit_s, "connector": info,
        "accuracy": score.accuracy, "per_class": score.per_class,
        "support": {"precision": score.precision, "recall": score.recall, "f1": score.f1},
    }  # fmt: skip
    print(
        f"  planted layer {width} → {width}, {n_tokens:,} tokens: labelled in "
        f"{result['seconds']:.1f} s; accuracy {score.accuracy:.3f}, F1 {score.f1:.3f}",
        flush=True,
    )
    layout = RunLayout.of(run)
    weights_path, codes = layout.connect.weights, layout.codes
    if real and weights_path.is_file() and CodesFiles(codes).manifest.is_file():
        from coact.codes.store import CodeStore

        store = CodeStore.open(codes)
        x, y = store.read_site(SITES[0]), store.read_site(SITES[1])
        grounded = layout.jacobian.connections
        jacobian = pl.read_parquet(grounded) if grounded.is_file() else None
        contexts = store.read_tokens()["context"].to_numpy()
        result = _time_labels(x, y, pl.read_parquet(weights_path), logic, contexts, jacobian)
        result.pop("_features")
        out["smollm2_L3"] = {"source": f"{codes.resolve().relative_to(ROOT)} {SITES}",
                             "jacobian_candidates": jacobian is not None, **result}  # fmt: skip
        print(f"  SmolLM2 layer 3: labelled in {result['seconds']:.1f} s", flush=True)
    return out


def _warm_up(logic: LogicConfig) -> None:
    """Load the compiled kernels (numba cache) and scikit-learn's HDBSCAN, untimed."""
    tiny = PlantedConfig(n_tokens=4000, n_inputs=32, n_sum=2, n_or=2, n_and=2, n_and_not=2,
                         n_nonlinear=5, n_unexplained=2, n_dead=1)  # fmt: skip
    run_planted(tiny, logic)


def markdown(result: dict[str, Any]) -> str:
    p = result["planted"]
    lines = ["### Planted circuits (default settings)", ""]
    head = "| seed | accuracy | " + " | ".join(LABELS) + " | precision | recall | F1 |"
    lines += [head, "|" + "---|" * (len(LABELS) + 5)]
    for r in p["runs"]:
        cells = [f"{r['per_class'].get(c, float('nan')):.3f}" for c in LABELS]
        s = r["support"]
        lines.append(
            f"| {r['seed']} | {r['accuracy']:.3f} | " + " | ".join(cells)
            + f" | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} |"
        )  # fmt: skip
    m = p["mean"]
    cells = [f"{m['per_class'][c]:.3f}" for c in LABELS]
    s = m["support"]
    lines.append(
        f"| **mean** | **{m['accuracy']:.3f}** | " + " | ".join(cells)
        + f" | {s['precision']:.3f} | {s['recall']:.3f} | **{s['f1']:.3f}** |"
    )  # fmt: skip
    lines += ["", "Confusion (rows: planted, columns: label; summed over seeds)", ""]
    lines += ["| planted \\ label | " + " | ".join(LABELS) + " |", "|" + "---|" * (len(LABELS) + 1)]
    for t, row in p["confusion_summed_over_seeds"].items():
        lines.append(f"| {t} | " + " | ".join(str(row[c]) for c in LABELS) + " |")
    kinds = m["per_kind"]
    lines += ["", "Accuracy per planted rule (mean over seeds): "
              + ", ".join(f"{k} {v:.3f}" for k, v in kinds.items())]  # fmt: skip
    bare = p["ablation_connector_inputs_only"]["mean"]
    lines += [
        "",
        f"Ablation, the connector's inputs only (no pruning, no completion): accuracy "
        f"{bare['accuracy']:.3f}, support F1 {bare['support']['f1']:.3f} (mean over seeds)",
    ]
    lines += ["", "### Stress (harder planted settings; mean over seeds)", ""]
    lines += ["| setting | accuracy | " + " | ".join(LABELS) + " | F1 |",
              "|" + "---|" * (len(LABELS) + 3)]  # fmt: skip
    for name, m in result["stress"]["mean_over_seeds"].items():
        cells = [f"{m['per_class'][c]:.3f}" for c in LABELS]
        lines.append(
            f"| {name} | {m['accuracy']:.3f} | " + " | ".join(cells)
            + f" | {m['support']['f1']:.3f} |"
        )  # fmt: skip
    lines += ["", "### Time to label every output of a layer", ""]
    lines += ["| problem | tokens | n_in → n_out | active/token | alive | seconds | features/s |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, t in result["timing"].items():
        lines.append(
            f"| {name} | {t['tokens']:,} | {t['n_in']} → {t['n_out']} | "
            f"{t['active_inputs_per_token']:.1f} | {t['alive_outputs']} | {t['seconds']:.1f} | "
            f"{t['features_per_second']:.0f} |"
        )
    for name, t in result["timing"].items():
        c = t["coverage"]
        lines += ["", f"{name}: {c['explained']} of {c['alive']} alive features "
                  f"({c['share_explained']:.1%}) labelled (not UNEXPLAINED) with coverage ≥ "
                  f"{c['coverage_target']:.0%}; median coverage {c['median_coverage']:.2f}, "
                  f"median AUC {c['median_auc']:.2f}; inputs needed for "
                  f"{c['coverage_target']:.0%}: {c['inputs_needed_histogram']}"]  # fmt: skip
        counts = ", ".join(f"{k} {v}" for k, v in sorted(t["labels"].items()))
        rules = ", ".join(f"{k} {v}" for k, v in sorted(t["rules"].items()))
        lines += ["", f"{name}: labels {counts}; rules {rules}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="planted runs (seeds 0, 1, ...)")
    parser.add_argument("--quick", action="store_true", help="two seeds, a 20,000-token layer")
    parser.add_argument("--no-real", action="store_true", help="skip the SmolLM2 layer")
    parser.add_argument("--threads", type=int, default=2, help="numba threads")
    parser.add_argument("--out", default=None)
    parser.add_argument("--run", default=str(RUN), help="run directory of the real layer")
    args = parser.parse_args()

    numba.set_num_threads(min(args.threads, numba.get_num_threads()))
    logic = LogicConfig()
    _warm_up(logic)
    began = time.perf_counter()
    seeds = list(range(2 if args.quick else args.seeds))
    print(f"planted circuits, default settings, seeds {seeds}", flush=True)
    planted_result = planted(seeds, PlantedConfig(), logic)
    print("ablation: the connector's inputs only (no pruning, no completion)", flush=True)
    bare = planted(seeds, PlantedConfig(), replace(logic, prune=False, complete=False))
    planted_result["ablation_connector_inputs_only"] = {
        "mean": bare["mean"], "confusion_summed_over_seeds": bare["confusion_summed_over_seeds"]
    }  # fmt: skip
    print("stress: harder planted settings (not targets: where the labels give way)", flush=True)
    stress = {
        name: planted(seeds, replace(PlantedConfig(), **change), logic)["mean"]
        for name, change in STRESS.items()
    }
    print("timing: label every output of a layer", flush=True)
    n_tokens = 20_000 if args.quick else 100_000
    timed = timing(n_tokens, 2304, logic, not (args.quick or args.no_real), Path(args.run))
    try:
        import torch

        torch_threads: int | None = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        torch_threads = None
    result = {
        "benchmark": "bench_logic",
        "quick": args.quick,
        "targets": {
            "accuracy": TARGET_ACCURACY,
            "support_f1": TARGET_F1,
            "seconds_per_layer": TARGET_SECONDS,
        },
        "logic_config": asdict(logic),
        "machine": {
            "cpu_count": os.cpu_count(),
            "numba_threads": numba.get_num_threads(),
            "torch_threads": torch_threads,
            "torch_used": False,
            "numpy": np.__version__,
            "numba": numba.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "planted": planted_result,
        "stress": {"settings": STRESS, "mean_over_seeds": stress},
        "timing": timed,
        "total_seconds": time.perf_counter() - began,
    }
    result["markdown"] = markdown(result)
    print()
    print(result["markdown"])
    default = ROOT / "analyses" / "results" / "bench_logic.json"
    out = Path(args.out) if args.out else default
    if args.quick and not args.out:
        out = Path(tempfile.gettempdir()) / "bench_logic.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
