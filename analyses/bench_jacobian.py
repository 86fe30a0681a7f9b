"""The jacobian stage's cost on a real run, against a plain forward pass of the model up to
the block over the same contexts, side by side in one run.

It reads a finished `coact analyze` run (its SAEs and the connectors' held-out contexts,
the tokens the stage reads in a run) and times:
  forward  — the model up to the MLP's input site (what collecting those tokens costs);
  jacobian — the whole stage: Jacobians, aggregation, score, formulas, agreement.
Writes analyses/results/bench_jacobian.json (seconds, the ratio, tokens, and the stage's
headline). Target (issue): ≤ 2 minutes on 2 CPU cores at the default budget.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from coact.codes.store import CodeStore
from coact.jacobian.stage import JacobianConfig, jacobian
from coact.models.load import LoadedModel, load_model
from coact.models.sites import SitePair
from coact.models.tracing import capture
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.shared import calibration_tokens, run_contexts
from coact.rundir.files import read_json
from coact.rundir.layout import RunLayout
from coact.sae.formats import load_sae

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `coact analyze` run directory")
    parser.add_argument("--out", type=Path, default=ROOT / "analyses/results/bench_jacobian.json")
    args = parser.parse_args()
    layout = RunLayout.of(args.run)
    config = AnalyzeConfig.from_dict(read_json(layout.config) or {}).resolved()
    lm = load_model(config.model, device=config.device, seed=config.seed)
    pair = SitePair.mlp(config.layer)
    sae_in, sae_out = (load_sae(layout.sae_dir(s.slug)) for s in (pair.in_site, pair.out_site))
    store = CodeStore.of(layout.codes)
    tokens = _held_out(config, lm, store)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, tokens.shape[0], config.jacobian.batch_size):
            capture(lm, tokens[start : start + config.jacobian.batch_size], [pair.in_site])
    forward = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        result = jacobian(
            lm, pair, sae_in, sae_out, tokens, scratch, JacobianConfig(progress=False),
            causal=layout.calibrate.causal, causal_contexts=config.calibrate.contexts,
        )  # fmt: skip
        stage = time.perf_counter() - started
    report = {
        "run": str(args.run),
        "threads": torch.get_num_threads(),
        "contexts": int(tokens.shape[0]),
        "tokens": result.tokens,
        "forward_s": forward,
        "jacobian_s": stage,
        "jacobian_over_forward": stage / forward,
        "target_s": 120.0,
        "result": result.to_dict(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"jacobian stage {stage:.0f} s on {result.tokens:,} tokens ({stage / forward:.1f}× the "
        f"forward pass to the block, {forward:.1f} s); target ≤ 120 s → {args.out}"
    )


def _held_out(config: AnalyzeConfig, lm: LoadedModel, store: CodeStore) -> torch.Tensor:
    """The contexts the run's jacobian stage reads: the connectors' held-out ones."""
    _, code_part = run_contexts(config, lm)
    return torch.as_tensor(calibration_tokens(code_part, store, config.connect))


if __name__ == "__main__":
    main()
