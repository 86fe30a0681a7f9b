"""A 'cuda' device emulated on the CPU, to find device-mixing bugs without a GPU.

Inside `fake_cuda()`, a tensor 'on cuda' is a CPU tensor carrying a marker attribute:
`.to("cuda")`, factories called with `device="cuda"` and modules moved with
`Module.to("cuda")` mark what they make, every op marks its outputs when an input is
marked, `.device` reads `cuda:0` on a marked tensor, and `.numpy()` of one raises. An op
that mixes a marked tensor with an unmarked one of one or more dimensions raises
`DeviceMix`, as CUDA would (CPU scalars, CPU indices into a cuda tensor and cross-device
copies are allowed, as on CUDA).

What it cannot see: ops run outside the Python-visible torch API in other threads, and
tensors made inside functorch transforms (the outputs of `torch.func.vmap` are marked when
an input is). It finds mixes; the numerics are the CPU's.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.func
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

MARK = "_coact_fake_cuda"
FAKE = torch.device("cuda", 0)
INDEXING = ("__getitem__", "__setitem__", "index_put_", "index_put")
UNCHECKED = ("copy_", "set:data", "__deepcopy__", "_has_compatible_shallow_copy_type")
PLAIN = ("tolist", "item", "copy_", "set:data")  # outputs that are never tensors to mark


class DeviceMix(RuntimeError):
    """An op mixed a (fake) cuda tensor with a CPU one."""


def marked(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and bool(getattr(t, MARK, False))


def _mark(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        setattr(t, MARK, True)
    return t


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _cpu(x: Any) -> Any:
    return torch.device("cpu") if _is_cuda(x) else x


def _name(func: Any) -> str:
    """'to', 'matmul', ... and 'get:device' for a property's getter."""
    name = getattr(func, "__name__", str(func))
    if name in ("__get__", "__set__"):
        owner = getattr(getattr(func, "__self__", None), "__name__", "?")
        return ("get:" if name == "__get__" else "set:") + owner
    return name


def _target(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Where a transfer goes: 'cuda', 'cpu', or None (a dtype change only)."""
    if name in ("cpu", "cuda"):
        return name
    for a in (*args[1:], kwargs.get("device"), kwargs.get("other")):
        if isinstance(a, torch.Tensor):
            return "cuda" if marked(a) else "cpu"
        if isinstance(a, str | torch.device):
            return "cuda" if _is_cuda(a) else "cpu"
    return None


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(t.requires_grad)


class FakeCuda(TorchFunctionMode):
    """The torch-function mode that marks and checks (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = _name(func)
        if name == "get:device":
            return FAKE if marked(args[0]) else func(*args, **kwargs)
        if name == "get:is_cuda":
            return marked(args[0])
        if name == "get_device":
            return 0 if marked(args[0]) else -1
        if name == "numpy" and marked(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy (fake cuda)")
        if name in ("to", "cpu", "cuda"):
            return self._transfer(func, name, args, kwargs)
        on_cuda = _is_cuda(kwargs.get("device"))
        if on_cuda:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        wrapped = any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
        if not wrapped and name not in UNCHECKED:
            _check(name, args, tensors)
        out = func(*args, **kwargs)
        if name not in PLAIN and (on_cuda or any(marked(t) for t in tensors)):
            tree_map(_mark, out)
        return out

    def _transfer(self, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        source, target = args[0], _target(name, args, kwargs)
        if name == "cuda":
            return source if marked(source) else _mark(source.clone())
        if name == "cpu":
            return _fresh(source) if marked(source) else source
        out = func(*(_cpu(a) for a in args), **{k: _cpu(v) for k, v in kwargs.items()})
        if target == "cuda" or (target is None and marked(source)):
            return _mark(out.clone() if out is source and not marked(source) else out)
        if target == "cpu" and marked(source) and out is source:
            return _fresh(source)
        return out


def _check(name: str, args: tuple[Any, ...], tensors: list[torch.Tensor]) -> None:
    if not any(marked(t) for t in tensors):
        return
    if name in INDEXING:
        if not marked(args[0]):
            _fail(name, "a CPU tensor indexed by a cuda tensor")
        value = args[2] if name == "__setitem__" and len(args) > 2 else None
        if isinstance(value, torch.Tensor) and not marked(value) and value.dim() > 0:
            _fail(name, "a cuda tensor assigned a CPU tensor through an index")
        return
    cpu = [tuple(t.shape) for t in tensors if not marked(t) and t.dim() > 0]
    if cpu:
        _fail(name, f"cuda tensors with CPU tensors of shapes {cpu[:3]}")


def _fail(name: str, what: str) -> None:
    frames = [
        f"  {f.filename}:{f.lineno} in {f.name}"
        for f in traceback.extract_stack()[:-3]
        if "/coact/" in f.filename or "/tests/" in f.filename
    ]
    raise DeviceMix(f"{name}: {what}\n" + "\n".join(frames))


def _module_to(real: Callable[..., Any]) -> Callable[..., Any]:
    def to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device", args[0] if args else None)
        out = real(self, *(_cpu(a) for a in args), **{k: _cpu(v) for k, v in kwargs.items()})
        if isinstance(device, str | torch.device):
            for t in (*self.parameters(), *self.buffers()):
                if _is_cuda(device):
                    _mark(t)
                elif marked(t):
                    delattr(t, MARK)
        return out

    return to


def _marking(transform: Callable[..., Any]) -> Callable[..., Any]:
    """A functorch transform whose outputs are marked when an input is."""

    def apply(fn: Callable[..., Any], *targs: Any, **tkwargs: Any) -> Callable[..., Any]:
        inner = transform(fn, *targs, **tkwargs)

        def call(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            if any(marked(t) for t in tree_flatten((args, kwargs))[0]):
                tree_map(_mark, out)
            return out

        return call

    return apply


def _holds(module: Any, attr: str, value: Any) -> bool:
    try:
        return getattr(module, attr, None) is value
    except Exception:  # lazy modules may fail on attribute access
        return False


@contextmanager
def fake_cuda() -> Iterator[None]:
    """Emulate 'cuda' inside the block; every patch is undone on the way out."""
    vmap = torch.func.vmap
    to = _module_to(torch.nn.Module.to)
    patches: list[tuple[Any, str, Any]] = [
        (torch.nn.Module, "to", to),
        (torch.nn.Module, "cpu", lambda self: to(self, "cpu")),
        (torch.nn.Module, "cuda", lambda self, device=None: to(self, "cuda")),
        (torch.cuda, "is_available", lambda: True),
        (torch.cuda, "synchronize", lambda *a, **k: None),
    ]
    patches += [
        (module, "vmap", _marking(vmap))
        for module in list(sys.modules.values())
        if _holds(module, "vmap", vmap)
    ]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    with ExitStack() as stack:
        stack.callback(lambda: [setattr(o, a, v) for o, a, v in saved])
        for owner, attr, value in patches:
            setattr(owner, attr, value)
        stack.enter_context(FakeCuda())
        yield
