"""Collection throughput against a plain forward pass, and bytes per token of the store.

Timings over the same contexts, interleaved in one run: every variant runs on a slice of
128 contexts (in an order that rotates; a shard each, the store's default) before the next
slice, so that on a busy machine neighbouring timings see the same load; throughput sums
all slices and repeats:
  plain         — the bare PyTorch model, stopped by a hook after the last needed module;
  capture       — nnsight reading the two sites (what tracing costs);
  hooks         — forward hooks reading the two sites (what collection now uses);
  collect_plain — the old stage: nnsight, torch.topk encoding;
  collect_float32 — the stage with its float32 encoder product: hooks, the compiled TopK
                  selection (shards written by a thread where a core is free for it);
  collect       — the stage as configured by default: on CPUs with AMX the encoders' product
                  screened in bfloat16, only the candidates scored in float32.
Each collection variant is one collection run in slices: its reused buffers are kept
from slice to slice, as they are from shard to shard within one collection.
Ratios are throughput relative to `plain` (target for collect: ≥ 0.9), each with a 95 %
bootstrap interval over the slices (the run's own spread, not the machine's drift between
runs). collect_plain and
collect_float32 write the same bytes except where an exact float32 tie at the k-th place is
broken otherwise by torch.topk than by the compiled selection (such rows are counted, with
the relative gap between the swapped values: 0 for a tie); collect holds the same features
with values equal to float32 rounding (checked); the screen's counts (rows widened or
scored in full) are kept.
The store written by `collect` is measured against
nonzeros × (index + value) bytes (target ≤ 1.2×) and against a dense float32 layout.
`--device cuda` runs it on a GPU (synchronised timings); writes `--json`
(default analyses/results/bench_collect.json, or bench_collect_<device>.json off CPU).
On a GPU machine, from the repository root (the package installed, or PYTHONPATH=.):
  python analyses/bench_collect.py --device cuda --repeats 5 --json $OUT/bench_collect_cuda.json
`--models smollm2-135m` or `--models pythia-70m-shaped` runs one model only.
`--layers all` reads both MLP sites of every block in one pass, as a whole-model run collects
(the plain pass then runs the whole model); the default reads block 3's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from coact.calibrate.losses import bootstrap_mean_ratio
from coact.codes import collect as collect_module
from coact.codes import screen as screen_module
from coact.codes.collect import CollectConfig, collect_codes, encode_csr
from coact.codes.corpus import Contexts, CorpusConfig, build_contexts
from coact.codes.forward import read_sites
from coact.codes.store import CodeStore
from coact.models.adapters import adapter_for, resolve
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.sae.base import Sae

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


class _Stop(Exception):
    pass


def pythia_70m_shaped(device: str) -> LoadedModel:
    """Random weights in Pythia-70m's shape (6 layers, d 512), with the real GPT-NeoX
    tokenizer (the tiny test models' where the shared data is absent, e.g. on a GPU machine:
    the weights are random, so only the token count matters)."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=8,
        rotary_pct=0.25,  # type: ignore[call-arg]
        max_position_embeddings=2048,
        use_parallel_residual=True,
    )
    model = GPTNeoXForCausalLM(config).eval().to(device)
    path = SHARED / "gpt-neox-20b-tokenizer.json"
    tokenizer = (
        PreTrainedTokenizerFast(
            tokenizer_file=str(path), bos_token="<|endoftext|>", eos_token="<|endoftext|>"
        )
        if path.is_file()
        else load_model("tiny-gpt-neox").tokenizer
    )
    return LoadedModel("pythia-70m-shaped-random", model, tokenizer, adapter_for(model))


def random_sae(d_model: int, site: Site, k: int = 32, device: str = "cpu") -> Sae:
    """Random TopK weights, the same in every run (seeded by the site): an exact float32
    tie at the k-th place, which the paths may break differently, is then no chance."""
    sae = Sae(d_model, 4 * d_model, activation="topk", k=k, site=str(site))
    gen = torch.Generator().manual_seed(sum(map(ord, str(site))))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn(p.shape, generator=gen) * d_model**-0.5)
    return sae.eval().requires_grad_(False).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CPU_SECONDS: dict[str, list[float]] = {}  # per variant: this process's CPU seconds


def _timed(fn: Callable[[int], object], repeat: int, device: str, name: str = "") -> float:
    """Wall seconds of fn(repeat); its CPU seconds (all of this process's threads) are
    kept in CPU_SECONDS[name]: on a shared machine they do not count others' load."""
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn(repeat)
    _sync(device)
    CPU_SECONDS.setdefault(name, []).append(time.process_time() - cpu)
    return time.perf_counter() - start


@torch.no_grad()
def plain_forward(lm: LoadedModel, tokens: torch.Tensor, layer: int, batch: int) -> None:
    module = resolve(lm.model, f"{lm.adapter.block(layer)}.{lm.adapter.mlp}")

    def stop(*_: object) -> None:
        raise _Stop

    handle = module.register_forward_hook(stop)
    try:
        for i in range(0, tokens.shape[0], batch):
            with contextlib.suppress(_Stop):
                lm.model(tokens[i : i + batch].to(lm.device))
    finally:
        handle.remove()


def _reads(
    read: Callable[..., object],
    lm: LoadedModel,
    tokens: torch.Tensor,
    sites: list[Site],
    batch: int,
) -> None:
    with torch.no_grad():
        for i in range(0, tokens.shape[0], batch):
            read(lm, tokens[i : i + batch], sites)


def _old_collect(*args: object) -> object:
    """The stage as it was: nnsight reads, torch.topk encoding (the writer thread stays:
    with one shard in flight its cost is the write itself)."""
    saved = collect_module.read_sites, collect_module.encode_csr
    collect_module.read_sites = capture
    collect_module.encode_csr = lambda sae, x, centred=False, **_: encode_csr(
        sae, x, fused=False, centred=centred
    )
    try:
        return collect_codes(*args)  # type: ignore[arg-type]
    finally:
        collect_module.read_sites, collect_module.encode_csr = saved


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*.safetensors"))
    }


SLICE = 128  # contexts per slice: every variant runs on a slice before the next slice


def _slice(contexts: Contexts, lo: int, hi: int) -> Contexts:
    return dataclasses.replace(
        contexts,
        tokens=contexts.tokens[lo:hi],
        doc_ids=contexts.doc_ids[lo:hi],
        fingerprint=f"{contexts.fingerprint}:{lo}-{hi}",
    )


def _slices(n: int) -> list[tuple[int, int]]:
    """SLICE contexts each, the remainder joined to the last: a slice of a few contexts
    would time the stage's fixed cost per call (opening the store), not its throughput."""
    starts = list(range(0, n, SLICE))
    if len(starts) > 1 and n - starts[-1] < SLICE // 2:
        starts.pop()
    return list(pairwise([*starts, n]))


def run(
    lm: LoadedModel, layers: list[int], n_tokens: int, batch: int, repeats: int
) -> dict[str, Any]:
    """Every variant on one slice of contexts, in rotating order, then the next slice: on
    a busy machine neighbouring timings see the same load. Throughput sums every slice."""
    corpus = str(SHARED / "wikitext-2-test.txt") if SHARED.exists() else "embedded"
    contexts = build_contexts(CorpusConfig(source=corpus, n_tokens=n_tokens), lm.tokenizer)
    tokens, device = contexts.tokens, str(lm.device)
    sites = [Site(kind, layer) for layer in layers for kind in ("mlp_resid", "mlp_out")]
    layer = max(layers)  # the plain forward pass stops after its MLP
    saes = {site: random_sae(lm.adapter.d_model, site, device=device) for site in sites}
    config = CollectConfig(forward_batch=batch)  # a shard per slice, as in a real collection
    float32 = dataclasses.replace(config, screen="off")
    capture(lm, tokens[:batch], sites)  # warm-up (and the compiled selection's load)
    warm = read_sites(lm, tokens[:batch], sites)[sites[0]][0]
    encode_csr(saes[sites[0]], warm)
    encode_csr(saes[sites[0]], warm, screen="bf16")
    screen = screen_module.resolve_screen(config.screen, device)
    counts_before = dataclasses.replace(screen_module.COUNTS)
    scratch = Path(tempfile.mkdtemp(prefix="coact-bench-"))
    slices = _slices(len(tokens))

    def variants(lo: int, hi: int, tag: str) -> dict[str, Callable[[int], object]]:
        part, t = _slice(contexts, lo, hi), tokens[lo:hi]
        return {
            "plain": lambda _: plain_forward(lm, t, layer, batch),
            "capture": lambda _: _reads(capture, lm, t, sites, batch),
            "hooks": lambda _: _reads(read_sites, lm, t, sites, batch),
            "collect_plain": lambda _: _old_collect(
                lm, part, saes, scratch / f"old{tag}", float32, True
            ),
            "collect_float32": lambda _: collect_codes(
                lm, part, saes, scratch / f"f32{tag}", float32, keep_buffers=True
            ),
            "collect": lambda _: collect_codes(
                lm, part, saes, scratch / f"new{tag}", config, keep_buffers=True
            ),
        }

    names = list(variants(0, 1, "-"))
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for r in range(repeats):
            for i, (lo, hi) in enumerate(slices):
                fns = variants(lo, hi, f"{r}-{i}")
                turn = (r * len(slices) + i) % len(names)
                for name in names[turn:] + names[:turn]:
                    times[name].append(_timed(fns[name], r, device, name))
        first = [f"0-{i}" for i in range(len(slices))]  # the first pass's slices

        def stores(prefix: str) -> list[CodeStore]:
            return [CodeStore.open(scratch / f"{prefix}{tag}") for tag in first]

        identical = all(
            _files(scratch / f"old{tag}") == _files(scratch / f"f32{tag}") for tag in first
        )
        agreement = _agreement(stores("old"), stores("new"))
        float32_agreement = _agreement(stores("old"), stores("f32"))
        storage = _storage(CodeStore.open(scratch / "new0-0"))
    finally:
        shutil.rmtree(scratch)
    total = {name: sum(values) for name, values in times.items()}
    cpu = {name: sum(CPU_SECONDS.pop(name)) for name in names}
    per_slice = {
        name: [p / t for p, t in zip(times["plain"], values, strict=True)]
        for name, values in times.items()
    }
    n = int(tokens.numel()) * repeats
    return {
        "model": lm.name,
        "device": device,
        "layer": layer,
        "layers": layers,
        "tokens": int(tokens.numel()),
        "contexts": int(tokens.shape[0]),
        "sae_width": 4 * lm.adapter.d_model,
        "repeats": repeats,
        "slice_contexts": SLICE,
        "seconds": times,
        "tokens_per_s": {name: n / t for name, t in total.items()},
        "ratio_vs_plain": {name: total["plain"] / t for name, t in total.items()},
        "ratio_vs_plain_ci95": _ratio_intervals(times),
        "ratio_vs_plain_median_of_slices": {
            name: float(statistics.median(values)) for name, values in per_slice.items()
        },
        "cpu_seconds": cpu,
        "ratio_vs_plain_cpu_time": {name: cpu["plain"] / t for name, t in cpu.items()},
        "collect_float32_bytes_identical_to_plain_path": identical,
        "collect_float32_vs_plain_path": float32_agreement,  # ties broken otherwise: gap 0
        "screen": screen,
        "collect_vs_plain_path": agreement,
        "screen_counts": _screen_counts(counts_before),
        "store_bytes_per_token": storage,
    }


def _ratio_intervals(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each variant's ratio to the plain pass (Σ plain / Σ variant) with its 95 % percentile
    bootstrap interval over slices: every variant resamples the same slices, as each slice
    timed them all side by side. It covers the slices' spread within this run, not the
    machine's drift between runs."""
    plain = np.asarray(times["plain"])
    out = {}
    for name, values in times.items():
        interval = bootstrap_mean_ratio(plain, np.asarray(values), n_boot=10_000)
        out[name] = [float(interval.low), float(interval.high)]
    return out


def _agreement(plain: list[CodeStore], ours: list[CodeStore]) -> dict[str, object]:
    """How many rows hold other features than the float32 path's, how far apart the values
    of the features swapped there are (a tie within float32 rounding: the two paths sum the
    dot products in different orders), and how far the shared values differ."""
    rows = differing = 0
    worst, swapped = 0.0, 0.0
    for a, b in zip(plain, ours, strict=True):
        for slug in a.sites:
            x, y = a.read_site(slug), b.read_site(slug)
            rows += x.shape[0]
            changed = _changed_rows(x, y)
            differing += len(changed)
            for r in changed:
                swapped = max(swapped, _swap_gap(x[r], y[r]))
            same = np.ones(x.shape[0], dtype=bool)
            same[changed] = False
            xs, ys = x[same], y[same]
            if xs.nnz:
                worst = max(worst, float(np.max(np.abs(xs.data - ys.data) / np.abs(xs.data))))
    return {
        "rows": rows,
        "rows_with_other_features": differing,
        "max_relative_gap_of_swapped_values": swapped,
        "max_relative_value_difference": worst,
    }


def _changed_rows(x: sp.csr_matrix, y: sp.csr_matrix) -> np.ndarray:
    """Rows whose features differ between x and y."""
    if np.array_equal(x.indptr, y.indptr):
        where = np.flatnonzero(x.indices != y.indices)
        return np.unique(np.searchsorted(x.indptr, where, side="right") - 1)
    return np.array(
        [r for r in range(x.shape[0]) if not np.array_equal(x[r].indices, y[r].indices)], int
    )


def _swap_gap(x: sp.csr_matrix, y: sp.csr_matrix) -> float:
    """The relative gap between the values of the features one row holds and the other
    does not (inf when their counts differ)."""
    gone = np.sort(x[:, np.setdiff1d(x.indices, y.indices)].data)
    new = np.sort(y[:, np.setdiff1d(y.indices, x.indices)].data)
    if len(gone) != len(new) or not len(gone):
        return float("inf")
    return float(np.max(np.abs(gone - new) / np.abs(gone)))


def _screen_counts(before: screen_module.ScreenCounts) -> dict[str, float]:
    """The screen's counts over this run (warm-up and every variant that screened)."""
    now = screen_module.COUNTS
    rows = now.rows - before.rows
    return {
        "rows": rows,
        "widened_rows": now.widened_rows - before.widened_rows,
        "full_rows": now.full_rows - before.full_rows,
        "fallback_rate": (now.widened_rows - before.widened_rows + now.full_rows - before.full_rows)
        / max(rows, 1),
        "dot_products_per_row": (now.scored - before.scored) / max(rows, 1),
    }


def _storage(store: CodeStore) -> dict[str, dict[str, float]]:
    storage = {}
    for slug in store.sites:
        sizes = store.bytes_per_token(slug)
        storage[slug] = {
            **sizes,
            "ratio_vs_ideal": sizes["stored"] / sizes["ideal"],
            "ratio_vs_dense_float32": sizes["stored"] / sizes["dense_float32"],
        }
    return storage


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument(
        "--layers", "--layer", default="3", help="blocks whose MLPs are read: 3, 0,5 or all"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch and numba threads")
    parser.add_argument("--models", default="smollm2-135m,pythia-70m-shaped")
    parser.add_argument("--json", "--out", dest="json", default=None, help="where to write")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    out = Path(args.json or ROOT / "analyses" / "results" / f"bench_collect{suffix}.json")
    load_before = _load()
    results = []
    for name in args.models.split(","):
        lm = (
            pythia_70m_shaped(args.device)
            if name == "pythia-70m-shaped"
            else load_model(name, device=args.device)
        )
        n_layers = lm.adapter.n_layers
        layers = range(n_layers) if args.layers == "all" else map(int, args.layers.split(","))
        results.append(run(lm, sorted(layers), args.tokens, args.batch, args.repeats))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": _load(),
    }
    out.write_text(json.dumps({**meta, "runs": results}, indent=2))
    print(f"load average before {load_before}, after {meta['load_average_1_5_15_after']}")
    for r in results:
        ratios = ", ".join(f"{k} {v:.2f}×" for k, v in r["ratio_vs_plain"].items())
        where = f"layers {r['layers']}" if len(r["layers"]) > 1 else f"layer {r['layer']}"
        print(f"{r['model']} {where} on {r['device']}: vs plain forward: {ratios}")
        bounds = ", ".join(
            f"{k} [{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in r["ratio_vs_plain_ci95"].items()
        )
        print(f"  95 % interval over slices: {bounds}")
        medians = ", ".join(
            f"{k} {v:.2f}×" for k, v in r["ratio_vs_plain_median_of_slices"].items()
        )
        print(f"  median of the slices' ratios: {medians}")
        by_cpu = ", ".join(f"{k} {v:.2f}×" for k, v in r["ratio_vs_plain_cpu_time"].items())
        print(f"  by this process's CPU seconds: {by_cpu}")
        print(
            f"  float32 stage, same bytes as the old path: "
            f"{r['collect_float32_bytes_identical_to_plain_path']} "
            f"({r['collect_float32_vs_plain_path']}); screen {r['screen']}: "
            f"{r['collect_vs_plain_path']}, {r['screen_counts']}"
        )
        for slug, sizes in r["store_bytes_per_token"].items():
            print(
                f"  {slug}: {sizes['stored']:.1f} B/token = {sizes['ratio_vs_ideal']:.3f}× ideal, "
                f"{sizes['ratio_vs_dense_float32']:.3f}× dense float32"
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
