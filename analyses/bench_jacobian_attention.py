"""Attention's Jacobian at the same position against the MLP's, on the embedded SmolLM2.

Per batch of contexts (the jacobian stage's batch, 4 × 128 tokens), the per-token
Jacobians of block LAYER's MLP (`mlp_resid → mlp_out`) and of its attention
(`resid_pre → attn_out`, `coact.jacobian.attention_map`), between random TopK SAEs of the
default recipe's shape (width 4 × d_model, k 32: the cost depends on the shapes and k, not
on what the SAEs learned). Records wall and CPU seconds of each (CPU seconds are what a
loaded machine cannot inflate much), the peak resident memory, and the time a stage at
the default budget would take (held-out contexts / batch × seconds per batch).

    python analyses/bench_jacobian_attention.py [--batches 2] [--layer 3]

Writes analyses/results/bench_jacobian_attention.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

from coact.codes.corpus import CorpusConfig, build_contexts
from coact.jacobian.stage import JacobianConfig, Maps
from coact.models.load import load_model
from coact.models.sites import SitePair
from coact.models.tracing import capture
from coact.sae.base import Sae

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_CONTEXTS = 79  # the connectors' held-out tenth of 100k code tokens, 127 per context


def _sae(d: int, seed: int) -> Sae:
    gen = torch.Generator().manual_seed(seed)
    sae = Sae(d, 4 * d, activation="topk", k=32)
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(4 * d, d, generator=gen), dim=1))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "analyses/results/bench_jacobian_attention.json"
    )
    args = parser.parse_args()
    lm = load_model("smollm2-135m")
    d, batch = lm.adapter.d_model, JacobianConfig().batch_size
    contexts = build_contexts(CorpusConfig(n_tokens=args.batches * batch * 127), lm.tokenizer)
    rows: dict[str, Any] = {}
    for name, pair in (
        ("mlp", SitePair.mlp(args.layer)),
        ("attention", SitePair.attention(args.layer)),
    ):
        maps = Maps(lm, pair, _sae(d, 0), _sae(d, 1), skip=1)
        wall = cpu = 0.0
        for b in range(args.batches):
            tokens = contexts.tokens[b * batch : (b + 1) * batch]
            streams = capture(lm, tokens, [pair.in_site])[pair.in_site].float()
            w, c = time.perf_counter(), time.process_time()
            found = maps.of(streams).token_jacobians(maps.rows(streams))
            wall, cpu = wall + time.perf_counter() - w, cpu + time.process_time() - c
        rows[name] = {
            "wall_s_per_batch": wall / args.batches,
            "cpu_s_per_batch": cpu / args.batches,
            "stage_cpu_s_estimate": cpu / args.batches * HELD_OUT_CONTEXTS / batch,
            "active_inputs_per_token": float((found.inputs >= 0).sum(1).float().mean()),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        print(name, json.dumps(rows[name]), flush=True)
    rows["attention_over_mlp_cpu"] = (
        rows["attention"]["cpu_s_per_batch"] / rows["mlp"]["cpu_s_per_batch"]
    )
    rows["machine"] = {"cpus": torch.get_num_threads(), "platform": platform.platform()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows["attention_over_mlp_cpu"]))


if __name__ == "__main__":
    main()
