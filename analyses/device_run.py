"""`coact analyze` on a GPU, measured: what `analyses/device_check.sh` runs on the device.

Builds the config as `coact analyze` does (budget 'full'), leaves out the stages asked
(the report by default: mkdocs and vl-convert do not travel), and runs it in this process
so that it can read the GPU's peak memory: overall, and per stage (each stage record's call
and the SAE/code preparation are wrapped). Whatever happens — a finished run, an error or
an interrupt (`timeout -s INT`) — it writes one JSON with the wall time, the peaks, the
error if any, the summary's timings and the versions, and exits non-zero unless the run
finished.

    python3 analyses/device_run.py --layer 3 --device cuda --control --run-dir /tmp/run \\
        --json $OUT/device_run.json

`--weights` only loads the model and prints (and writes) a sha256 of its weights: the
embedded model converted on another machine must give the same number.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from coact.models.load import EMBEDDED, load_model  # noqa: E402
from coact.pipeline.config import AnalyzeConfig  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--layers", default=None, help="a model run: 'all', '0-5' or '1,3'")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", help="the model's weights' dtype")
    parser.add_argument("--run-dir", default="/tmp/run")
    parser.add_argument("--control", action="store_true")
    parser.add_argument("--drop", default="report", help="stages left out, comma-separated")
    parser.add_argument("--add", default="", help="opt-in stages added, e.g. transcoder")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--sae-tokens", type=int, default=None)
    parser.add_argument("--json", default=None, help="where the measurements go")
    parser.add_argument("--weights", action="store_true", help="only hash the model's weights")
    return parser.parse_args(argv)


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of every tensor of the state dict (sorted by name) as float32 bytes."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_config(args: argparse.Namespace) -> AnalyzeConfig:
    """The config `coact analyze` would build from the same options."""
    from coact.pipeline.budgets import with_budget
    from coact.pipeline.config import BLOCK_STAGES, parse_layers

    layers = parse_layers(args.layers) if args.layers else None
    config = AnalyzeConfig(
        model=args.model, layer=args.layer, layers=layers, device=args.device,
        dtype=args.dtype, run_dir=args.run_dir, control=args.control,
    )  # fmt: skip
    drop = tuple(s for s in args.drop.split(",") if s)
    add = (*(BLOCK_STAGES if layers else ()), *(s for s in args.add.split(",") if s))
    config = config.with_stages(add=add, drop=drop)
    config = with_budget(config, "survey" if layers else "full")
    return dataclasses.replace(
        config,
        tokens=config.tokens if args.tokens is None else args.tokens,
        sae_tokens=config.sae_tokens if args.sae_tokens is None else args.sae_tokens,
    )


def _where(run_dir: Any) -> str:
    """'control/', 'L<n>/' (a layer of a model run) or '' (a one-layer run)."""
    name = Path(str(run_dir)).name
    if name == "control":
        return "control/"
    return f"{name}/" if name[:1] == "L" and name[1:].isdigit() else ""


class Peaks:
    """GPU peak memory and wall time per stage call (no-ops without CUDA). Each call
    resets the peak; the overall peak is kept across the resets."""

    def __init__(self, device: str, checkpoint: Any = None) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.stages: list[dict[str, Any]] = []
        self.checkpoint = checkpoint  # called after each stage: a kill leaves what ran
        self._overall = (0, 0)

    def overall(self) -> tuple[int, int] | None:
        """(allocated, reserved) peak bytes over the whole run so far."""
        if not self.cuda:
            return None
        now = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
        return (max(self._overall[0], now[0]), max(self._overall[1], now[1]))

    def wrap(self, name_of: Any, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            name = name_of(*args)
            if self.cuda:
                torch.cuda.synchronize()
                self._overall = self.overall() or (0, 0)
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                self.stages.append(
                    {
                        "stage": name,
                        "wall_s": round(time.perf_counter() - started, 3),
                        "peak_allocated_bytes": torch.cuda.max_memory_allocated()
                        if self.cuda
                        else None,
                    }
                )
                if self.checkpoint is not None:
                    self.checkpoint()

        return wrapped

    def install(self) -> None:
        import coact.pipeline.control as control
        import coact.pipeline.run as run
        from coact.pipeline.stages import Stage

        def stage_name(stage: Any, layer_run: Any) -> str:
            return _where(layer_run.layout.run_dir) + stage.name

        def prepare_name(config: Any, *_: Any) -> str:
            return _where(config.resolved_run_dir()) + "prepare (SAEs, codes)"

        Stage.__call__ = self.wrap(stage_name, Stage.__call__)  # type: ignore[method-assign]
        for module in (run, control):
            module.prepare = self.wrap(prepare_name, module.prepare)  # type: ignore[attr-defined]


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory}
    for name in ("transformers", "nnsight", "polars", "numba", "numpy", "scipy", "sklearn"):
        try:
            info[name] = __import__(name).__version__
        except Exception as error:  # a missing package is a finding, not a crash
            info[name] = f"unavailable: {error}"
    return info


def run(args: argparse.Namespace, record: dict[str, Any]) -> int:
    from coact.pipeline.run import analyze

    peaks = Peaks(args.device, lambda: write(args, record))
    peaks.install()
    record["stages"] = peaks.stages
    config = build_config(args)
    record["config"] = {"stages": list(config.stages), "tokens": config.tokens,
                        "sae_tokens": config.sae_tokens, "control": config.control,
                        "layers": config.layers, "dtype": config.dtype}  # fmt: skip
    try:
        summary = analyze(config)
    finally:
        overall = peaks.overall()
        if overall is not None:
            record["peak_allocated_bytes"], record["peak_reserved_bytes"] = overall
    record["timings"] = getattr(summary, "timings", None)
    return 0


def write(args: argparse.Namespace, record: dict[str, Any]) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    record: dict[str, Any] = {"argv": sys.argv[1:], "environment": environment(args.device)}
    started, code = time.perf_counter(), 1
    try:
        if args.weights:
            lm = load_model(args.model, device="cpu")
            record["weights_sha256"] = weights_sha256(lm.model)
            print(record["weights_sha256"])
            code = 0
        else:
            code = run(args, record)
    except BaseException as error:  # an interrupt from `timeout` too: record, then report
        record["error"] = "".join(traceback.format_exception(error))[-6000:]
        print(record["error"], file=sys.stderr)
    finally:
        record["ok"] = code == 0
        record["wall_s"] = round(time.perf_counter() - started, 3)
        write(args, record)
    return code


if __name__ == "__main__":
    sys.exit(main())
