"""SAE training step: the sparse step against autograd through full-width codes.

Both take one Adam step on the same batch of SmolLM2-shaped activations (d_model 576,
width 2304, k 32, 1024 tokens), side by side in one run, from identical trainers:
  dense   — `coact.sae.train.dense_loss` (codes of full width, decoder a dense product);
  sparse  — `SaeTrainer.step` (decoder and both gradients over the chosen latents only).
Each is timed with and without AuxK (dead latents present), and the largest gradient
difference between them is recorded. The trainer updates one SAE per site, so this step is
most of the SAE-training stage when many sites train together (`coact analyze --layers`).
Writes analyses/results/bench_sae_train.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from coact.sae.train import SaeTrainConfig, SaeTrainer, dense_loss

ROOT = Path(__file__).resolve().parents[1]


def _trainer(data: torch.Tensor, dead: bool, seed: int) -> SaeTrainer:
    config = SaeTrainConfig(dead_after_tokens=0 if dead else 10**12)
    trainer = SaeTrainer(data, config, torch.Generator().manual_seed(seed))
    if dead:  # every latent but a tenth has been silent for a long time
        trainer.last_fired[: trainer.sae.width // 10] = 10**9
        trainer.log.tokens_seen = 10**6
    return trainer


def _dense_step(trainer: SaeTrainer, batch: torch.Tensor) -> None:
    loss = dense_loss(trainer, batch, trainer.log.tokens_seen + batch.shape[0])
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()


def _grad(parameter: torch.Tensor) -> torch.Tensor:
    if parameter.grad is None:
        raise RuntimeError("a parameter has no gradient after the step")
    return parameter.grad


def _time(step: Any, repeats: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def measure(repeats: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(576, 576, generator=gen) / 24
    data = 3 + torch.randn(1024, 576, generator=gen) @ mixing
    rows: dict[str, Any] = {}
    for dead in (False, True):
        dense, sparse = _trainer(data, dead, 1), _trainer(data, dead, 1)
        # Gradients of one step, compared before the optimizers move the two apart.
        with mock.patch.object(sparse.optimizer, "step", lambda: None):
            sparse.step(data)
        dense.optimizer.zero_grad(set_to_none=True)
        dense_loss(dense, data, dense.log.tokens_seen + data.shape[0]).backward()
        diff = max(
            float((_grad(a) - _grad(b)).abs().max() / _grad(b).abs().max().clamp_min(1e-30))
            for a, b in zip(sparse.sae.parameters(), dense.sae.parameters(), strict=True)
        )
        t_dense = _time(lambda d=dense: _dense_step(d, data), repeats)
        t_sparse = _time(lambda s=sparse: s.step(data), repeats)
        rows["auxk" if dead else "topk"] = {
            "dense_s": t_dense,
            "sparse_s": t_sparse,
            "speedup": t_dense / t_sparse,
            "max_relative_gradient_difference": diff,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=ROOT / "analyses/results/bench_sae_train.json")
    args = parser.parse_args()
    result = {
        "shape": {"d_in": 576, "width": 2304, "k": 32, "batch_tokens": 1024},
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "steps": measure(args.repeats, args.threads),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in result["steps"].items():
        print(
            f"{name}: dense {row['dense_s'] * 1e3:.1f} ms, sparse {row['sparse_s'] * 1e3:.1f} ms "
            f"({row['speedup']:.2f}×), gradients agree to "
            f"{row['max_relative_gradient_difference']:.1e}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
