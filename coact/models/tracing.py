"""Reading and rewriting site activations with nnsight, in execution order.

`capture` runs a forward pass only up to the last block it needs (`tracer.stop()`), since
the LM head of a small model costs more than half of its forward. `spliced_logits` runs a
full pass with one site rewritten, for loss measurements.

A model held in bfloat16 (`load_model(dtype=...)`) is read and written at this boundary
alone: activations leave as float32, and what a splice writes returns in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from nnsight import NNsight
from torch import Tensor

from coact.errors import CoactError
from coact.models.adapters import ModulePoint, resolve
from coact.models.load import LoadedModel
from coact.models.sites import Site

SpliceFn = Callable[[Tensor], Tensor]


def wrap(lm: LoadedModel) -> NNsight:
    """The nnsight view of the model, made once per LoadedModel."""
    cached = getattr(lm, "_nnsight", None)
    if cached is None:
        cached = NNsight(lm.model)
        lm._nnsight = cached  # type: ignore[attr-defined]
    return cached


def _read(envoy: Any, point: ModulePoint) -> Any:
    value = envoy.output if point.port == "output" else envoy.input
    return value[point.index] if point.index is not None else value


@torch.no_grad()
def capture(lm: LoadedModel, tokens: Tensor, sites: Sequence[Site]) -> dict[Site, Tensor]:
    """Activations (batch, seq, d) at each site, stopping after the last needed module."""
    model = wrap(lm)
    ordered = sorted(set(sites), key=lm.adapter.order_key)
    points = {site: lm.adapter.point(site) for site in ordered}
    saved: dict[ModulePoint, Any] = {}
    with model.trace(tokens.to(lm.device)) as tracer:
        for point in dict.fromkeys(points.values()):
            saved[point] = _read(resolve(model, point.path), point).save()
        tracer.stop()
    out = {site: _as_tensor(saved[point]).float() for site, point in points.items()}
    check_finite(out)
    return out


def check_finite(acts: dict[Site, Tensor]) -> None:
    """One clear error for the first site with a NaN or inf. A sum is checked first (a NaN
    or inf in it makes the sum one): the elementwise check, several times slower, runs only
    when the sum is not finite."""
    for site, value in acts.items():
        if not (bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())):
            raise CoactError(f"non-finite (NaN or inf) activations at {site}; check the model")


def _as_tensor(value: Any) -> Tensor:
    return value.value if hasattr(value, "value") else value


def _in_float32(fn: SpliceFn) -> SpliceFn:
    """fn run on float32 and its result cast back to the dtype it replaces."""

    def spliced(value: Tensor) -> Tensor:
        return fn(value.float()).to(value.dtype)

    return spliced


@torch.no_grad()
def spliced_logits(
    lm: LoadedModel, tokens: Tensor, site: Site | None, fn: SpliceFn | None
) -> Tensor:
    """Logits of a full forward pass with `site` replaced by fn(activation) (clean if None)."""
    model = wrap(lm)
    tokens = tokens.to(lm.device)
    adapter = lm.adapter
    with model.trace(tokens):
        if site is not None and fn is not None:
            fn = _in_float32(fn)
            adapter.check(site)
            kind = adapter.mlp_resid_kind() if site.kind == "mlp_resid" else site.kind
            block = adapter.block(site.layer)
            if kind == "mlp_out":
                mlp = resolve(model, f"{block}.{adapter.mlp}")
                mlp.output = fn(mlp.output)
            elif kind == "mlp_in":
                mlp = resolve(model, f"{block}.{adapter.mlp}")
                mlp.input = fn(mlp.input)
            elif kind == "attn_out":
                attn = resolve(model, f"{block}.{adapter.attn}")
                out = attn.output
                attn.output = (fn(out[0]), *out[1:])
            elif kind == "resid_mid":
                # No module outputs resid_mid; rewrite attention's output so that the
                # stream resid_pre + attn_out becomes fn(resid_mid).
                resid_pre = resolve(model, f"{block}.{adapter.attn_norm}").input
                attn = resolve(model, f"{block}.{adapter.attn}")
                out = attn.output
                attn.output = (fn(resid_pre + out[0]) - resid_pre, *out[1:])
            elif site.layer == adapter.n_layers:  # resid_pre after the last block
                norm = resolve(model, adapter.final_norm)
                norm.input = fn(norm.input)
            else:  # resid_pre: the output of the previous block (or the embedding)
                source = adapter.embed_out if site.layer == 0 else adapter.block(site.layer - 1)
                envoy = resolve(model, source)
                envoy.output = fn(envoy.output)
        logits = model.output.save()
    return _logits(logits)


def _logits(saved: Any) -> Tensor:
    result = _as_tensor(saved)
    return (result.logits if hasattr(result, "logits") else result[0]).float()


MlpSpliceFn = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def mlp_spliced_logits(lm: LoadedModel, tokens: Tensor, layer: int, fn: MlpSpliceFn) -> Tensor:
    """Logits of a full pass with the MLP output of `layer` replaced by fn(stream the MLP
    reads, MLP output): e.g. a connector's prediction from the MLP's input features."""
    model = wrap(lm)
    point = lm.adapter.mlp_input_point(layer)
    with model.trace(tokens.to(lm.device)):
        stream = _read(resolve(model, point.path), point)
        mlp = resolve(model, lm.adapter.mlp_path(layer))
        out = mlp.output
        mlp.output = fn(stream.float(), out.float()).to(out.dtype)
        logits = model.output.save()
    return _logits(logits)


@torch.no_grad()
def mlp_output_after_edit(
    lm: LoadedModel, tokens: Tensor, layer: int, edit: SpliceFn
) -> tuple[Tensor, Tensor]:
    """(stream the MLP read, MLP output) with that stream replaced by edit(stream) for the
    MLP only; the pass stops after the MLP. For causal checks of connections."""
    model = wrap(lm)
    point = lm.adapter.mlp_input_point(layer)
    assert point.port == "input" and point.index is None
    with model.trace(tokens.to(lm.device)) as tracer:
        norm = resolve(model, point.path)
        edited = _in_float32(edit)(norm.input)
        norm.input = edited
        saved_in = edited.save()  # type: ignore[attr-defined]
        saved_out = resolve(model, lm.adapter.mlp_path(layer)).output.save()
        tracer.stop()
    return _as_tensor(saved_in).float(), _as_tensor(saved_out).float()


@torch.no_grad()
def attention_output_with_input(
    lm: LoadedModel, tokens: Tensor, layer: int, stream: Tensor
) -> Tensor:
    """attn_out[layer] (batch, seq, d) when attention reads `stream` (batch, seq, d) in
    place of resid_pre[layer]: the stream is written as the input of the attention's norm,
    so only attention sees it (the residual skip carries on untouched); the pass stops
    after attention. For causal checks of what attention reads from which position."""
    if stream.shape != (*tokens.shape, lm.adapter.d_model):
        raise CoactError(
            f"stream must be (batch, seq, d_model) = {(*tokens.shape, lm.adapter.d_model)}, "
            f"got {tuple(stream.shape)}"
        )
    model = wrap(lm)
    norm_path, point = lm.adapter.attn_norm_path(layer), lm.adapter.point(Site("attn_out", layer))
    with model.trace(tokens.to(lm.device)) as tracer:
        resolve(model, norm_path).input = stream.to(lm.device, lm.dtype)
        saved = _read(resolve(model, point.path), point).save()
        tracer.stop()
    return _as_tensor(saved).float()


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-position cross-entropy of predicting token t+1, shape (batch, seq-1), in nats."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)
