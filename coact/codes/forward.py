"""Reading sites with plain PyTorch hooks, for collection's many forward passes.

`coact.models.tracing.capture` reads the same activations through nnsight, whose trace
costs a fixed few milliseconds per call: nothing beside a CPU forward of thousands of
tokens, but on a GPU it can be longer than the forward itself. Collection only reads
(never edits) sites, so forward hooks do: each point's tensor is taken as the module
sees it (`input`: the first positional argument, else the first keyword argument, as
nnsight's `.input`), and the pass stops after the last module needed. `read_sites` keeps
the tensors; `stream_sites` hands each to a sink as the pass reaches it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from coact.errors import CoactError
from coact.models.adapters import ModulePoint, resolve
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import check_finite


class _Stop(Exception):
    """Raised by the hook of the last needed module: the rest of the model is not run."""


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else next(iter(kwargs.values()))


def _hooks(
    lm: LoadedModel, points: list[ModulePoint], take: Callable[[ModulePoint, Any], None]
) -> list[Any]:
    """Register one hook per point, each handing its tensor to `take`; the last point's
    hook stops the pass."""
    handles = []
    for n, point in enumerate(points):
        module: nn.Module = resolve(lm.model, point.path)
        last = n == len(points) - 1

        def keep(value: Any, point: ModulePoint = point, last: bool = last) -> None:
            take(point, value[point.index] if point.index is not None else value)
            if last:
                raise _Stop

        if point.port == "input":
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args, kwargs, keep=keep: keep(_first_input(args, kwargs)),
                    with_kwargs=True,
                )
            )
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, keep=keep: keep(out)))
    return handles


@torch.no_grad()
def read_sites(lm: LoadedModel, tokens: Tensor, sites: Sequence[Site]) -> dict[Site, Tensor]:
    """Activations (batch, seq, d) at each site, as `capture` gives them, without nnsight."""
    out: dict[Site, Tensor] = {}
    stream_sites(lm, tokens, sites, out.__setitem__)
    check_finite(out)
    return out


@torch.no_grad()
def stream_sites(
    lm: LoadedModel, tokens: Tensor, sites: Sequence[Site], sink: Callable[[Site, Tensor], None]
) -> None:
    """sink(site, activations) for each site as the pass reaches it. A sink that copies
    what it needs lets the model free its tensors as it goes: kept to the end of the pass,
    a whole model's sites (hundreds of MB) are new memory every pass, page by page."""
    ordered = sorted(set(sites), key=lm.adapter.order_key)
    points = {site: lm.adapter.point(site) for site in ordered}
    readers: dict[ModulePoint, list[Site]] = {}
    for site, point in points.items():
        readers.setdefault(point, []).append(site)
    reached: set[ModulePoint] = set()

    def take(point: ModulePoint, value: Tensor) -> None:
        reached.add(point)
        for site in readers[point]:
            sink(site, value)

    handles = _hooks(lm, list(readers), take)
    try:
        with contextlib.suppress(_Stop):
            lm.model(tokens.to(lm.device))
    finally:
        for handle in handles:
            handle.remove()
    if missing := [p.path for p in readers if p not in reached]:
        raise CoactError(f"the forward pass never reached {missing}; check the model's adapter")
