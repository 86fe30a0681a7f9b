"""Collection: run the model over contexts, encode each site with its SAE, store sparse codes.

Contexts are grouped into shards of a fixed size; each shard is computed from the same
batches whether or not the run was interrupted, so a resumed collection writes the same
bytes as an uninterrupted one. The BOS position is not encoded (it is an attention sink
whose activation no SAE is trained on); the token table says which positions are stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeGuard

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from coact.codes._topk import topk_csr
from coact.codes.corpus import Contexts
from coact.codes.forward import read_sites, stream_sites
from coact.codes.scratch import release_scratch, scratch
from coact.codes.screen import resolve_screen, screen_weights, screened_topk_csr
from coact.codes.store import CodeStore
from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import check_finite
from coact.progress import tqdm
from coact.rundir.layout import CodesFiles
from coact.sae.base import Sae, SparseAutoencoder
from coact.sae.evaluate import check_sae_fits
from coact.settings import setting

SCREEN_ROWS = 16384  # rows the screen encodes at once, at most
SCREEN_BYTES = 512 * 2**20  # and what they hold, all sites' waiting rows (or one product) in all


@dataclass(frozen=True)
class CollectConfig:
    forward_batch: int = 16  # contexts per forward pass
    shard_contexts: int = 128  # contexts per shard: the unit of resumption
    values_dtype: str = "float32"
    skip_first_positions: int = 1
    screen: str = setting(
        "auto",
        "TopK encoders: 'bf16' picks candidates with a bfloat16 product and scores only them "
        "in float32 (the same features, values to float32 rounding), 'off' the float32 "
        "product alone, 'auto' bf16 on CPUs with AMX",
    )


def sae_fingerprint(sae: SparseAutoencoder) -> str:
    """sha256 of an SAE's shape, rule and weights (hashed once while they are unchanged)."""
    if isinstance(sae, Sae):
        return _cached(sae, list(sae.state_dict().values()), lambda: _sae_digest(sae))
    return _sae_digest(sae)


def _sae_digest(sae: SparseAutoencoder) -> str:
    digest = hashlib.sha256()
    if isinstance(sae, Sae):
        digest.update(json.dumps(sae.describe(), sort_keys=True).encode())
        for key, tensor in sae.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    else:
        digest.update(repr((type(sae).__name__, sae.d_in, sae.width, sae.site)).encode())
    return digest.hexdigest()


_FINGERPRINTS: weakref.WeakKeyDictionary[object, tuple[tuple[int, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def _cached(owner: object, params: list[Tensor], compute: Callable[[], str]) -> str:
    """A fingerprint hashed once per object while its tensors are the same (storage and
    in-place version): hashing a model's weights costs about a second per call."""
    signature = tuple(x for p in params for x in (p.data_ptr(), p._version))
    hit = _FINGERPRINTS.get(owner)
    if hit is None or hit[0] != signature:
        hit = (signature, compute())
        _FINGERPRINTS[owner] = hit
    return hit[1]


def model_fingerprint(lm: LoadedModel) -> str:
    """`lm.fingerprint()`, hashed once while its weights are unchanged."""
    return _cached(lm.model, list(lm.model.state_dict().values()), lm.fingerprint)


def collection_fingerprint(
    model_fingerprint: str,
    contexts: Contexts,
    saes: Mapping[Site, SparseAutoencoder],
    config: CollectConfig,
    screen: str = "off",
) -> str:
    """Everything that determines the stored bytes: model, corpus, SAEs, layout, dtype and
    the screen as resolved (values differ in their last bits with it; a store written
    without it keeps the fingerprint it had before the screen existed)."""
    settings = {name: value for name, value in asdict(config).items() if name != "screen"}
    payload: dict[str, object] = {
        "model": model_fingerprint,
        "corpus": contexts.fingerprint,
        "saes": {str(site): sae_fingerprint(sae) for site, sae in sorted(saes.items())},
        "config": settings,
    }
    if screen != "off":
        payload["screen"] = screen
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def collect_codes(
    lm: LoadedModel,
    contexts: Contexts,
    saes: Mapping[Site, SparseAutoencoder],
    directory: str | Path,
    config: CollectConfig = CollectConfig(),
    keep_buffers: bool = False,
) -> CodeStore:
    """Write (or finish writing) the code store for `saes` over `contexts` in `directory`.

    The collection's reused buffers (hundreds of MB) are released at the end, or kept for
    this thread's next collection with `keep_buffers` (calls that collect one corpus in
    parts, as the benchmark does)."""
    if not saes:
        raise CoactError("no SAEs given: nothing to collect")
    for site, sae in saes.items():
        check_sae_fits(sae, site, lm.adapter.d_model, lm.adapter.mlp_resid_kind())
    sites = sorted(saes, key=lm.adapter.order_key)
    screen = _screen_for(Path(directory), config.screen, lm.device)
    fingerprint = collection_fingerprint(model_fingerprint(lm), contexts, saes, config, screen)
    store = CodeStore.open_for_writing(
        directory,
        fingerprint=fingerprint,
        sites={site.slug: saes[site].width for site in sites},
        values_dtype=config.values_dtype,
        meta={
            "model": lm.name,
            "corpus": contexts.source,
            "corpus_fingerprint": contexts.fingerprint,
            "ctx_len": int(contexts.tokens.shape[1]),
            "skip_first_positions": config.skip_first_positions,
            "sites": {site.slug: str(site) for site in sites},
            "sae_fingerprints": {site.slug: sae_fingerprint(saes[site]) for site in sites},
            "screen": screen,
        },
    )
    n_shards = -(-contexts.tokens.shape[0] // config.shard_contexts)
    done = store.completed_shards
    bar = tqdm(total=n_shards, initial=len(done), desc="collecting codes", unit="shard")
    try:
        for _ in _write_shards(_Collection(lm, contexts, saes, sites, config, screen), store):
            bar.update(1)
    finally:
        bar.close()
        if not keep_buffers:
            release_scratch()
    return store


@dataclass(frozen=True)
class _Collection:
    """What every shard of one collection is computed from."""

    lm: LoadedModel
    contexts: Contexts
    saes: Mapping[Site, SparseAutoencoder]
    sites: list[Site]  # in the model's order
    config: CollectConfig
    screen: str  # as resolved: "bf16" or "off"


def _write_shards(job: _Collection, store: CodeStore) -> Iterator[int]:
    """Encode and write every shard the store lacks, yielding each one once written."""
    contexts, config = job.contexts, job.config
    n_ctx, size = contexts.tokens.shape[0], config.shard_contexts
    done = store.completed_shards
    with _writer(job.lm.device) as writer:
        pending: tuple[int, Future[None]] | None = None
        for index in (i for i in range(-(-n_ctx // size)) if i not in done):
            lo, hi = index * size, min(n_ctx, (index + 1) * size)
            codes = _encode_shard(job, lo, hi)
            if pending is not None:  # one shard in flight: its write overlaps this encoding
                pending[1].result()
                yield pending[0]
            table = _token_table(contexts, lo, hi, config.skip_first_positions)
            pending = index, writer.submit(_write, store, index, table, codes)
        if pending is not None:
            pending[1].result()
            yield pending[0]


def _writer(device: torch.device) -> ThreadPoolExecutor | _Inline:
    """Where shards are written: a thread where a core is free for it (the model on a GPU,
    or fewer torch threads than cores; its write then overlaps the next shard's encoding),
    else inline: with torch's threads on every core, a writer thread stalls the forward
    pass (torch waits on the thread it displaced) for longer than the write itself takes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if torch.device(device).type != "cpu" or torch.get_num_threads() < (cores or 1):
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="coact-shards")
    return _Inline()


class _Inline(contextlib.AbstractContextManager["_Inline"]):
    """An executor that runs each task when it is submitted."""

    def __exit__(self, *_: object) -> None:
        return None

    def submit(self, task: Callable[..., None], *args: object) -> Future[None]:
        done: Future[None] = Future()
        try:
            task(*args)
            done.set_result(None)
        except Exception as error:  # raised where a thread's would be: at .result()
            done.set_exception(error)
        return done


def _screen_for(directory: Path, choice: str, device: torch.device) -> str:
    """The screen this collection uses: a store being resumed keeps the one it was written
    with ("auto" follows it; a store from before the screen existed was written without),
    and an explicit other choice is refused: its values differ in the last bits, so its
    shards and these would not be one collection."""
    if not CodesFiles(directory).manifest.is_file():
        return resolve_screen(choice, device)
    written = str(CodeStore.open(directory).meta.get("screen", "off"))
    wanted = resolve_screen(written if choice == "auto" else choice, device)
    if wanted != written:
        raise CoactError(
            f"{directory} was collected with screen {written!r}, this run asks for "
            f"{wanted!r}: pass screen={written!r} (or 'auto') to resume it, or use another "
            "directory"
        )
    return wanted


def _encode_shard(job: _Collection, lo: int, hi: int) -> dict[str, list[sp.csr_matrix]]:
    """Codes of contexts lo..hi, batch by batch (always the same batches: resumable).

    The screen encodes many batches' rows at once (`_group_rows`): its fixed costs per call
    (the product's set-up, the rows' split over threads) are paid once a group, and its
    codes do not depend on how rows are grouped. The rows wait in reused buffers
    (`_Waiting`), copied (and centred) there as the pass reaches each site."""
    lm, saes, sites, config = job.lm, job.saes, job.sites, job.config
    codes: dict[str, list[sp.csr_matrix]] = {site.slug: [] for site in sites}
    group = _group_rows(lm.adapter.d_model, [saes[site].width for site in sites])
    skip = config.skip_first_positions
    centres = {site: decoder_bias_to_subtract(saes[site]) for site in sites}
    capacity = group + config.forward_batch * (job.contexts.tokens.shape[1] - skip)
    waiting = _Waiting(capacity, skip, centres)
    for start in range(lo, hi, config.forward_batch):
        batch = job.contexts.tokens[start : min(hi, start + config.forward_batch)]
        last = start + config.forward_batch >= hi
        if job.screen == "off" or group <= batch.shape[0] * (batch.shape[1] - skip):
            acts = read_sites(lm, batch, sites)  # a batch at a time
            for site in sites:
                rows = acts[site][:, skip:].reshape(-1, acts[site].shape[-1])
                codes[site.slug].append(encode_csr(saes[site], rows, screen=job.screen))
            continue
        stream_sites(lm, batch, sites, waiting.add)
        for site in sites:
            if last or waiting.filled[site] >= group:
                rows, centred = waiting.take(site)
                code = encode_csr(saes[site], rows, screen=job.screen, centred=centred)
                codes[site.slug].append(code)
    return codes


class _Waiting:
    """Each site's rows waiting for the screen, in reused buffers (`scratch`) of
    `capacity` rows; the first `skip` positions of each context are not kept. A site with
    a centre (its SAE's decoder bias) has it subtracted as the rows are copied, where
    their dtypes agree (the same float subtraction `encode_csr` would make)."""

    def __init__(self, capacity: int, skip: int, centres: Mapping[Site, Tensor | None]) -> None:
        self.capacity, self.skip, self.centres = capacity, skip, centres
        self.filled: dict[Site, int] = {}
        self.buffers: dict[Site, Tensor] = {}
        self.centred: dict[Site, bool] = {}

    def add(self, site: Site, acts: Tensor) -> None:
        """Check a batch's (batch, seq, d) activations, as `read_sites` does, and copy the
        positions kept after the rows waiting."""
        check_finite({site: acts})
        x = acts[:, self.skip :]
        buffer = scratch(f"pending:{site.slug}", (self.capacity, x.shape[-1]), x.dtype)
        at = self.filled.get(site, 0)
        rows = buffer[at:][: x.shape[0] * x.shape[1]].view(x.shape)
        centre = self.centres.get(site)
        if centre is not None and centre.dtype == x.dtype and centre.device == x.device:
            torch.sub(x, centre, out=rows)
            self.centred[site] = True
        else:
            rows.copy_(x)
            self.centred[site] = False
        self.buffers[site], self.filled[site] = buffer, at + x.shape[0] * x.shape[1]

    def take(self, site: Site) -> tuple[Tensor, bool]:
        """The rows waiting (a view of the buffer: use them before the next `add`), and
        whether they are centred."""
        rows = self.buffers[site][: self.filled[site]]
        self.filled[site] = 0
        return rows, self.centred[site]


def _group_rows(d_model: int, widths: list[int]) -> int:
    """Rows a site gathers before the screen encodes them: SCREEN_ROWS, fewer where the
    sites' waiting rows (4·d bytes each) or the widest product (2·width) would pass
    SCREEN_BYTES (a whole model's sites are collected in one pass)."""
    per_row = max(4 * d_model * len(widths), 2 * max(widths))
    return max(1, min(SCREEN_ROWS, SCREEN_BYTES // per_row))


def _write(
    store: CodeStore,
    index: int,
    tokens: dict[str, np.ndarray],
    codes: dict[str, list[sp.csr_matrix]],
) -> None:
    """Stack a shard's batches and write it (on the writer thread, or inline)."""
    store.write_shard(
        index, tokens, {slug: sp.vstack(parts, format="csr") for slug, parts in codes.items()}
    )


@torch.no_grad()
def encode_csr(
    sae: SparseAutoencoder,
    x: Tensor,
    fused: bool = True,
    screen: str = "off",
    centred: bool = False,
) -> sp.csr_matrix:
    """Codes as CSR. TopK SAEs skip the dense codes matrix: the top-k indices are the CSR;
    on CPU in float32 one compiled pass selects them (`_topk`, bit for bit the same), or
    with screen "bf16" a bfloat16 product picks candidates for it (`screen`). `centred`:
    a TopK SAE's decoder bias is already subtracted from x (`decoder_bias_to_subtract`)."""
    if centred and decoder_bias_to_subtract(sae) is None:
        raise ValueError("only rows for a TopK SAE that subtracts its decoder bias are centred")
    if not _is_topk(sae):
        return sp.csr_matrix(sae.encode(x).detach().to("cpu", torch.float32).numpy())
    assert sae.k is not None  # `_is_topk` checked it
    cpu32 = x.device.type == "cpu" and x.dtype == sae.W_enc.dtype == torch.float32
    bias32 = sae.b_enc.dtype == torch.float32
    screened = screen == "bf16" and fused and cpu32 and bias32
    weights = screen_weights(sae, sae.W_enc) if screened else None
    if weights is not None:
        if sae.subtract_decoder_bias and not centred:
            x = torch.sub(x, sae.b_dec, out=scratch("centred", tuple(x.shape), x.dtype))
        parts, _ = screened_topk_csr(x, weights, sae.b_enc.detach().numpy(), sae.k)
        return sp.csr_matrix(parts[::-1], shape=(len(x), sae.width))
    if sae.subtract_decoder_bias and not centred:
        x = x - sae.b_dec
    pre = x @ sae.W_enc  # Sae.pre_activations without its bias, which the selection adds
    if fused and cpu32 and bias32:
        parts = topk_csr(pre.numpy(), sae.b_enc.detach().numpy(), sae.k)
        return sp.csr_matrix(parts[::-1], shape=(len(pre), sae.width))
    pre += sae.b_enc
    values, indices = pre.topk(sae.k, dim=-1, sorted=False)
    indices, order = indices.sort(dim=-1)
    values = torch.relu(values.gather(-1, order))
    n, k = indices.shape
    matrix = sp.csr_matrix(
        (
            values.to("cpu", torch.float32).numpy().ravel(),
            indices.to("cpu", torch.int32).numpy().ravel(),
            np.arange(0, n * k + 1, k, dtype=np.int64),
        ),
        shape=(n, sae.width),
    )
    matrix.eliminate_zeros()
    return matrix


def _is_topk(sae: SparseAutoencoder) -> TypeGuard[Sae]:
    return isinstance(sae, Sae) and sae.activation == "topk" and sae.k is not None


def decoder_bias_to_subtract(sae: SparseAutoencoder) -> Tensor | None:
    """What `encode_csr` takes off a TopK SAE's input before its encoder (None where it
    takes nothing, or leaves the SAE's own encode to do it): rows waiting for the screen
    are centred as they are copied, one pass over them fewer."""
    if _is_topk(sae) and sae.subtract_decoder_bias:
        return sae.b_dec.detach()
    return None


def _token_table(contexts: Contexts, lo: int, hi: int, skip: int) -> dict[str, np.ndarray]:
    tokens = contexts.tokens[lo:hi, skip:].numpy()
    n, length = tokens.shape
    return {
        "context": np.repeat(np.arange(lo, hi, dtype=np.int32), length),
        "position": np.tile(np.arange(skip, skip + length, dtype=np.int32), n),
        "token_id": tokens.reshape(-1).astype(np.int32),
        "doc": contexts.doc_ids[lo:hi, skip:].numpy().reshape(-1).astype(np.int32),
    }
