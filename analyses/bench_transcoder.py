"""coact's TopK trainer beside sparsify's (EleutherAI sparsify 1.3.3) on the same cached
activations, width, k, token budget, batches and batch order: tokens per second of the
trainer itself and held-out FVU.

The MLP of block `--layer` of the embedded SmolLM2 is read once (its input after the norm,
`mlp_in`, and its output, `mlp_out`; the BOS position left out) on the first `--tokens`
corpus tokens and on `--held-contexts` contexts after them. Then, on exactly those rows:
  sae         — an SAE on the MLP's output: coact's `SaeTrainer` against sparsify's
                `SparseCoder` (autoencoding);
  transcoder  — a skip transcoder from the MLP's input to its output: coact's
                `TranscoderTrainer` against `SparseCoder` with transcode and skip_connection.
sparsify's step is its `Trainer`'s, reproduced from sparsify/trainer.py: the same init (b_dec
at the batch mean, and for a transcoder the encoder bias centring the pre-activations),
`SparseCoder.forward`'s FVU loss (AuxK off: `auxk_alpha` defaults to 0), the decoder kept at
unit norm with gradients parallel to it removed (SAEs), SignSGD wrapped in schedule-free
(momentum 0.95) at its learning-rate rule 5e-3 / sqrt(latents / 2^14), evaluated in the
wrapper's eval mode as its checkpoints are. coact's step is its own (Adam, AuxK). The model's
forward pass is left out of both: sparsify's `Trainer` runs the whole model per batch, coact
stops after the last needed block. Writes analyses/results/bench_transcoder.json (after
every trainer, so a stopped run keeps what finished).

    python analyses/bench_transcoder.py [--tokens 100000] [--layer 3] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from coact.codes.corpus import CorpusConfig, build_contexts
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.sae.train import SaeTrainConfig, SaeTrainer
from coact.transcoder.train import TranscoderTrainer

ROOT = Path(__file__).resolve().parents[1]
Rows = tuple[torch.Tensor, torch.Tensor]  # (mlp_in, mlp_out), tokens × d_model


def _fvu(y: torch.Tensor, pred: torch.Tensor) -> float:
    return float((y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def _rows(lm: LoadedModel, tokens: torch.Tensor, layer: int) -> Rows:
    sites = [Site("mlp_in", layer), Site("mlp_out", layer)]
    parts = [capture(lm, tokens[i : i + 16], sites) for i in range(0, tokens.shape[0], 16)]
    x, y = (torch.cat([p[s][:, 1:].reshape(-1, p[s].shape[-1]) for p in parts]) for s in sites)
    return x.float(), y.float()


def _timed(steps: Callable[[], object], n_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    steps()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": n_tokens, "tokens_per_s": n_tokens / seconds}


def _each(step: Callable[..., None], batches: list[tuple[torch.Tensor, ...]]) -> None:
    for batch in batches:
        step(*batch)


def _coact(kind: str, train: Rows, held: Rows, batches: list[torch.Tensor]) -> dict[str, Any]:
    config, gen = SaeTrainConfig(), torch.Generator().manual_seed(0)
    x, y = train
    if kind == "sae":
        sae_trainer = SaeTrainer(y[batches[0]], config, gen, site="mlp_out")
        timing = _timed(lambda: _each(sae_trainer.step, [(y[b],) for b in batches]), y.shape[0])
        sae = sae_trainer.finish()
        with torch.no_grad():
            fvu = _fvu(held[1], sae(held[1]))
        return {**timing, "heldout_fvu": fvu, "optimizer": "adam + auxk"}
    tc_trainer = TranscoderTrainer(x[batches[0]], y[batches[0]], config, gen)
    timing = _timed(lambda: _each(tc_trainer.step, [(x[b], y[b]) for b in batches]), y.shape[0])
    tc = tc_trainer.finish()
    with torch.no_grad():
        fvu = _fvu(held[1], tc(held[0]))
    return {**timing, "heldout_fvu": fvu, "optimizer": "adam + auxk"}


def _sparsify(kind: str, train: Rows, held: Rows, batches: list[torch.Tensor]) -> dict[str, Any]:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    transcode = kind == "transcoder"
    x, y = train if transcode else (train[1], train[1])
    d, config = y.shape[1], SaeTrainConfig()
    width = config.expansion * d
    torch.manual_seed(0)
    coder = SparseCoder(
        d, SparseCoderConfig(num_latents=width, k=config.k, transcode=transcode,
                             skip_connection=transcode), "cpu", dtype=torch.float32,
    )  # fmt: skip
    first = batches[0]
    with torch.no_grad():  # the Trainer's init on its first batch
        if transcode:
            coder.encoder.bias.data = -x[first].mean(0) @ coder.encoder.weight.data.T
        coder.b_dec.data = y[first].mean(0)
    lr = 5e-3 / math.sqrt(width / 2**14)
    optimizer = ScheduleFreeWrapper(
        SignSGD([{"params": coder.parameters(), "lr": lr}]), momentum=0.95
    )
    optimizer.train()

    def steps() -> None:
        for b in batches:
            if coder.cfg.normalize_decoder and not transcode:
                coder.set_decoder_norm_to_unit_norm()
            coder(x=x[b], y=y[b]).fvu.backward()
            if coder.cfg.normalize_decoder and not transcode:
                coder.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            optimizer.zero_grad()

    timing = _timed(steps, y.shape[0])
    optimizer.eval()
    hx, hy = held if transcode else (held[1], held[1])
    with torch.no_grad():
        fvu = float(coder(x=hx, y=hy).fvu)
    return {**timing, "heldout_fvu": fvu, "optimizer": "signum + schedule-free", "lr": lr}


def measure(model: str, layer: int, tokens: int, held_contexts: int, out: Path) -> dict[str, Any]:
    lm = load_model(model)
    n_train = -(-tokens // 127)
    corpus = CorpusConfig(n_tokens=(n_train + held_contexts) * 127)
    contexts = build_contexts(corpus, lm.tokenizer).tokens
    started = time.perf_counter()
    train = _rows(lm, contexts[:n_train], layer)
    capture_s = time.perf_counter() - started
    held = _rows(lm, contexts[n_train : n_train + held_contexts], layer)
    order = torch.randperm(train[0].shape[0], generator=torch.Generator().manual_seed(0))
    batches = list(order.split(SaeTrainConfig().batch_tokens))
    result: dict[str, Any] = {
        "model": model, "layer": layer, "width": SaeTrainConfig().expansion * lm.adapter.d_model,
        "k": SaeTrainConfig().k, "train_tokens": int(train[0].shape[0]),
        "batch_tokens": SaeTrainConfig().batch_tokens, "steps": len(batches),
        "heldout_tokens": int(held[0].shape[0]), "capture_seconds": capture_s,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "load_average": list(__import__("os").getloadavg()), "results": {},
    }  # fmt: skip
    for kind in ("sae", "transcoder"):
        for name, run in (("coact", _coact), ("sparsify", _sparsify)):
            result["results"].setdefault(kind, {})[name] = run(kind, train, held, batches)
            print(kind, name, json.dumps(result["results"][kind][name]), flush=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--held-contexts", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "analyses/results/bench_transcoder.json"))
    args = parser.parse_args()
    measure(args.model, args.layer, args.tokens, args.held_contexts, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
