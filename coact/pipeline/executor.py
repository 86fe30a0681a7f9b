"""Where a model run's layers run: in this process one after another (`serial`), or on a
Ray cluster (`ray`: `--address` names an existing one, else a local one is started with
`--workers` workers). Each Ray worker is an actor that loads the model and the run's shared
SAEs and codes once, then runs whole layers; the run directory's claims
(`coact.rundir.claims`) keep two writers off one layer, and a layer whose worker died is
handed to another worker (it resumes from the stages its first worker finished).

How a run executes is never written to config.json: it changes no result."""

from __future__ import annotations

import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from coact.errors import CoactError
from coact.settings import setting

T = TypeVar("T")
EXECUTORS = ("serial", "ray")
# passed on to Ray's workers, so they read the same model cache offline as the driver
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "COACT_CACHE")


@dataclass(frozen=True)
class Execution:
    """How `coact analyze` runs its layers (not what it computes)."""

    executor: str = setting("serial", "'serial' (this process) or 'ray' (Ray workers)")
    workers: int = setting(1, "layers run at once (more than 1 runs them on a local Ray cluster)")
    address: str | None = setting(None, "an existing Ray cluster ('auto' or host:port)")
    wait: bool = setting(True, "wait for another writer's claim on the run (else stop)")
    cpus_per_worker: float | None = None  # default: this machine's cores / workers
    gpus_per_worker: float | None = None  # default: 1 / workers of a GPU when the device is one
    retries: int = 2  # times a layer is handed to a new worker after its worker died

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise CoactError(f"unknown executor {self.executor!r}: choose serial or ray")
        if self.workers < 1:
            raise CoactError(f"--workers must be at least 1, got {self.workers}")

    @property
    def on_ray(self) -> bool:
        return self.executor == "ray" or self.workers > 1 or self.address is not None


class LayerWorker(Generic[T]):
    """A Ray actor's body: `setup` (the model and the shared SAEs and codes) once, then
    `work(state, layer)` per layer handed to it."""

    def __init__(self, setup: Callable[[], Any], threads: int) -> None:
        limit_threads(threads)
        self.state = setup()

    def run(self, layer: int, work: Callable[[Any, int], T]) -> T:
        return work(self.state, layer)

    def pid(self) -> int:
        return os.getpid()


def limit_threads(threads: int) -> None:
    """One worker's share of the cores, for torch's, numba's and the BLAS libraries' thread
    pools alike (a float sum's order, hence its last bit, can follow the thread count)."""
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)
    most = int(getattr(numba.config, "NUMBA_NUM_THREADS", threads))
    numba.set_num_threads(max(1, min(threads, most)))


def run_on_ray(
    layers: Sequence[int],
    setup: Callable[[], Any],
    work: Callable[[Any, int], T],
    execution: Execution,
    *,
    device: str = "cpu",
    done: Callable[[int, T], None] = lambda layer, result: None,
) -> dict[int, T]:
    """`work` on every layer, on Ray workers made by `setup`; `done` is called (here, in
    the driver) as each layer lands. A worker that dies has its layer redone by a new one,
    up to `execution.retries` times per layer."""
    ray = start_ray(execution)
    started_here = execution.address is None
    try:
        return _schedule(ray, list(layers), setup, work, execution, device, done)
    finally:
        if started_here:
            ray.shutdown()


def start_ray(execution: Execution) -> Any:
    """Connect to `execution.address`, or start a local cluster of this machine's cores:
    offline, with no dashboard and no usage statistics."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise CoactError(
            "--executor ray / --workers need Ray: pip install 'coact[ray]' (or ray)"
        ) from None
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if not ray.is_initialized():
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": True,
            "runtime_env": {"env_vars": env},
        }
        if execution.address is not None:
            options["address"] = execution.address
        ray.init(**options)
    return ray


def _resources(execution: Execution, device: str, n_workers: int) -> dict[str, float]:
    cpus = execution.cpus_per_worker
    if cpus is None:
        cpus = max(1.0, float((os.cpu_count() or 1) // n_workers))
    gpus = execution.gpus_per_worker
    if gpus is None:
        gpus = 1.0 / n_workers if device.startswith("cuda") else 0.0
    return {"num_cpus": cpus, "num_gpus": gpus}


def _schedule(
    ray: Any,
    layers: list[int],
    setup: Callable[[], Any],
    work: Callable[[Any, int], T],
    execution: Execution,
    device: str,
    done: Callable[[int, T], None],
) -> dict[int, T]:
    """Hand layers to idle workers until all have landed; replace dead workers."""
    from ray.exceptions import RayActorError, RayTaskError

    n = min(execution.workers, len(layers)) or 1
    resources = _resources(execution, device, n)
    actor = ray.remote(max_restarts=0, max_task_retries=0, **resources)(LayerWorker)
    threads = max(1, int(resources["num_cpus"]))
    idle = [actor.remote(setup, threads) for _ in range(n)]
    pending, attempts = deque(layers), Counter[int]()
    running: dict[Any, tuple[Any, int]] = {}
    results: dict[int, T] = {}
    while pending or running:
        while pending and idle:
            worker, layer = idle.pop(), pending.popleft()
            running[worker.run.remote(layer, work)] = (worker, layer)
        [ref], _ = ray.wait(list(running), num_returns=1)
        worker, layer = running.pop(ref)
        try:
            results[layer] = ray.get(ref)
        except RayTaskError as error:  # the layer itself failed: its error is the run's
            raise error.as_instanceof_cause() from None
        except RayActorError as error:
            if getattr(error, "actor_init_failed", False):  # it never started: no retry helps
                last = str(error).strip().splitlines()[-1]
                raise CoactError(f"a Ray worker could not start: {last}") from None
            attempts[layer] += 1
            if attempts[layer] > execution.retries:
                raise CoactError(
                    f"layer {layer}: {attempts[layer]} workers died running it; see the Ray "
                    "logs (/tmp/ray/session_latest/logs) for why"
                ) from None
            print(f"coact: the worker on layer {layer} died; a new worker redoes it",
                  file=sys.stderr, flush=True)  # fmt: skip
            pending.appendleft(layer)
            worker = actor.remote(setup, threads)
        else:
            done(layer, results[layer])
        idle.append(worker)
    return results
