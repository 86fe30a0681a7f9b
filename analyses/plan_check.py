"""How far `coact plan`'s seconds are from measured runs.

1. CPU: the plan of `coact analyze --layer 3` on the embedded default (100k code tokens,
   400k SAE tokens) against runs/convergence/sae-400000/summary.json, the run with those
   budgets on 2 CPU cores (its SAE training is the plan's one extrapolation: the CPU rates
   were read at 100k SAE tokens; its other stages repeat the rates' run on a busy machine).
2. H200: the plan of the same job at 25k–400k code tokens against the GPU code ladder
   (analyses/results/convergence_gpu.json): the rates were read at 100k tokens
   (device_check.json), so the other four steps test the scaling by tokens.
Writes analyses/results/plan_check.json; prints each stage's predicted and measured seconds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from coact.pipeline.config import AnalyzeConfig
from coact.plan.estimate import make_plan

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "analyses" / "results"


def _compare(config: AnalyzeConfig, measured: dict[str, float]) -> dict[str, object]:
    plan = {s.stage: s.seconds for s in make_plan(config, threads=2).stages}
    rows = {}
    for key, seconds in measured.items():
        stage = key.removesuffix("_s")
        if stage in plan and plan[stage] is not None and seconds > 0.01:
            predicted = float(plan[stage])  # type: ignore[arg-type]
            rows[stage] = {
                "predicted_s": round(predicted, 2),
                "measured_s": round(seconds, 2),
                "ratio": round(predicted / seconds, 3),
            }
    total_p = sum(r["predicted_s"] for r in rows.values())
    total_m = sum(r["measured_s"] for r in rows.values())
    return {
        "stages": rows,
        "total": {
            "predicted_s": round(total_p, 1),
            "measured_s": round(total_m, 1),
            "ratio": round(total_p / total_m, 3),
        },
    }


def main() -> None:
    cpu_run = ROOT / "runs" / "convergence" / "sae-400000" / "summary.json"
    cpu = _compare(AnalyzeConfig(), json.loads(cpu_run.read_text())["timings"])
    gpu_steps = []
    ladder = json.loads((RESULTS / "convergence_gpu.json").read_text())["ladders"]["code"]
    for step in ladder["steps"]:
        config = dataclasses.replace(AnalyzeConfig(), device="cuda", tokens=int(step["budget"]))
        timings = {k: v for k, v in step["timings"].items() if k != "train_saes_s"}
        gpu_steps.append({"tokens": step["budget"], **_compare(config, timings)})
    out = {
        "what": __doc__.split("\n")[0],
        "cpu_analyze_layer3": {"measured": str(cpu_run.relative_to(ROOT)), **cpu},
        "h200_code_ladder": gpu_steps,
    }
    (RESULTS / "plan_check.json").write_text(json.dumps(out, indent=1))
    for name, block in (
        ("CPU analyze --layer 3", cpu),
        *((f"H200 {s['tokens']} tokens", s) for s in gpu_steps),
    ):
        stages = ", ".join(
            f"{k} {v['predicted_s']:.0f}/{v['measured_s']:.0f} s"
            for k, v in block["stages"].items()
        )
        t = block["total"]
        total = f"{t['predicted_s']}/{t['measured_s']} s ({t['ratio']}×)"
        print(f"{name}: predicted/measured {stages}; total {total}")


if __name__ == "__main__":
    main()
