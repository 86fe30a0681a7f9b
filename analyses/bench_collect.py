"""Collection throughput against a plain forward pass, and bytes per token of the store.

Three timings over the same contexts, side by side in one run:
  plain    — the bare PyTorch model, stopped by a hook after the last needed module;
  capture  — nnsight reading the two sites (what tracing costs);
  collect  — capture + SAE encoding + sparse store writing (the whole stage).
Ratios are throughput relative to `plain` (target for collect: ≥ 0.9). The store written
by `collect` is measured against nonzeros × (index + value) bytes (target ≤ 1.2×) and
against a dense float32 layout.
Writes analyses/results/bench_collect.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from coact.codes.collect import CollectConfig, collect_codes
from coact.codes.corpus import CorpusConfig, build_contexts
from coact.models.adapters import adapter_for, resolve
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.sae.base import Sae

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


class _Stop(Exception):
    pass


def pythia_70m_shaped() -> LoadedModel:
    """Random weights in Pythia-70m's shape (6 layers, d 512), with the real GPT-NeoX tokenizer."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=8,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        use_parallel_residual=True,
    )
    model = GPTNeoXForCausalLM(config).eval()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(SHARED / "gpt-neox-20b-tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
    )
    return LoadedModel("pythia-70m-shaped-random", model, tokenizer, adapter_for(model))


def random_sae(d_model: int, site: Site, k: int = 32) -> Sae:
    sae = Sae(d_model, 4 * d_model, activation="topk", k=k, site=str(site))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.normal_(0, d_model**-0.5)
    return sae.eval().requires_grad_(False)


@torch.no_grad()
def plain_forward(lm: LoadedModel, tokens: torch.Tensor, layer: int, batch: int) -> float:
    module = resolve(lm.model, f"{lm.adapter.block(layer)}.{lm.adapter.mlp}")

    def stop(*_: object) -> None:
        raise _Stop

    handle = module.register_forward_hook(stop)
    try:
        start = time.perf_counter()
        for i in range(0, tokens.shape[0], batch):
            with contextlib.suppress(_Stop):
                lm.model(tokens[i : i + batch])
        return time.perf_counter() - start
    finally:
        handle.remove()


def run(lm: LoadedModel, layer: int, n_tokens: int, batch: int, repeats: int) -> dict[str, object]:
    corpus = str(SHARED / "wikitext-2-test.txt") if SHARED.exists() else "embedded"
    contexts = build_contexts(CorpusConfig(source=corpus, n_tokens=n_tokens), lm.tokenizer)
    tokens = contexts.tokens
    sites = [Site("mlp_resid", layer), Site("mlp_out", layer)]
    saes = {site: random_sae(lm.adapter.d_model, site) for site in sites}
    config = CollectConfig(forward_batch=batch)
    capture(lm, tokens[:batch], sites)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "capture": [], "collect": []}
    storage: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        times["plain"].append(plain_forward(lm, tokens, layer, batch))
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, tokens.shape[0], batch):
                capture(lm, tokens[i : i + batch], sites)
        times["capture"].append(time.perf_counter() - start)
        scratch = Path(tempfile.mkdtemp(prefix="coact-bench-"))
        try:
            start = time.perf_counter()
            store = collect_codes(lm, contexts, saes, scratch / "codes", config)
            times["collect"].append(time.perf_counter() - start)
            for slug in store.sites:
                sizes = store.bytes_per_token(slug)
                storage[slug] = {
                    **sizes,
                    "ratio_vs_ideal": sizes["stored"] / sizes["ideal"],
                    "ratio_vs_dense_float32": sizes["stored"] / sizes["dense_float32"],
                }
        finally:
            shutil.rmtree(scratch)
    best = {name: min(values) for name, values in times.items()}
    n = int(tokens.numel())
    return {
        "model": lm.name,
        "layer": layer,
        "tokens": n,
        "contexts": int(tokens.shape[0]),
        "sae_width": 4 * lm.adapter.d_model,
        "seconds_best_of": repeats,
        "tokens_per_s": {name: n / t for name, t in best.items()},
        "ratio_vs_plain": {name: best["plain"] / t for name, t in best.items()},
        "store_bytes_per_token": storage,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "analyses" / "results" / "bench_collect.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    results = [
        run(load_model("smollm2-135m"), 3, args.tokens, args.batch, args.repeats),
        run(pythia_70m_shaped(), 3, args.tokens, args.batch, args.repeats),
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"torch_threads": torch.get_num_threads(), "runs": results}, indent=2)
    )
    for r in results:
        ratios = ", ".join(f"{k} {v:.2f}×" for k, v in r["ratio_vs_plain"].items())  # type: ignore[union-attr]
        print(f"{r['model']} layer {r['layer']}: throughput vs plain forward: {ratios}")
        for slug, sizes in r["store_bytes_per_token"].items():  # type: ignore[union-attr]
            print(
                f"  {slug}: {sizes['stored']:.1f} B/token = {sizes['ratio_vs_ideal']:.3f}× ideal, "
                f"{sizes['ratio_vs_dense_float32']:.3f}× dense float32"
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
