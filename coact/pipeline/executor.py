"""Where a model run's work runs: in this process one item after another (`serial`), or on
a Ray cluster (`ray`: `--address` names an existing one, else a local one is started with
`--workers` workers). Each Ray worker is an actor that loads what its items need once (the
model, and the run's shared SAEs and codes for layers), then runs whole items: groups of
SAEs to train, then layers. The run directory's claims (`coact.rundir.claims`) keep two
writers off one item, and an item whose worker died is handed to another worker (it
resumes from what its first worker finished).

How a run executes is never written to config.json: it changes no result."""

from __future__ import annotations

import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from coact.errors import CoactError
from coact.settings import setting

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
EXECUTORS = ("serial", "ray")
# passed on to Ray's workers, so they read the same model cache offline as the driver
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "COACT_CACHE")


@dataclass(frozen=True)
class Execution:
    """How `coact analyze` runs its SAE groups and layers (not what it computes)."""

    executor: str = setting("serial", "'serial' (this process) or 'ray' (Ray workers)")
    workers: int = setting(
        1, "SAE groups and layers run at once (more than 1 runs them on a local Ray cluster)"
    )
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


class Worker(Generic[T]):
    """A Ray actor's body: `setup` (the model, and for layers the shared SAEs and codes)
    once, then `work(state, key)` per item handed to it."""

    def __init__(self, setup: Callable[[], Any], threads: int) -> None:
        limit_threads(threads)
        self.state = setup()

    def run(self, key: Any, work: Callable[[Any, Any], T]) -> T:
        return work(self.state, key)

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
    keys: Sequence[K],
    setup: Callable[[], Any],
    work: Callable[[Any, K], T],
    execution: Execution,
    *,
    device: str = "cpu",
    done: Callable[[K, T], None] = lambda key, result: None,
    name: Callable[[K], str] = "layer {}".format,
) -> dict[K, T]:
    """`work` on every item of `keys` (layers, groups of SAEs), on Ray workers made by
    `setup`; `done` is called (here, in the driver) as each item lands. A worker that dies
    has its item (`name`d in messages) redone by a new one, up to `execution.retries` times
    per item."""
    with ray_cluster(execution) as ray:
        return _schedule(ray, list(keys), setup, work, execution, device, done, name)


@contextmanager
def ray_cluster(execution: Execution) -> Iterator[Any]:
    """Ray, connected for the block: a local cluster started here is shut down after it
    (or, inside `one_cluster`, after that), one already running (`--address`, or one an
    outer block started) is left as it was."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise CoactError(
            "--executor ray / --workers need Ray: pip install 'coact[ray]' (or ray)"
        ) from None
    started_here = not ray.is_initialized()
    if started_here:
        _connect(ray, execution)
    try:
        yield ray
    finally:
        if started_here and execution.address is None:
            if _held:
                _held[-1] = True  # `one_cluster` shuts it down
            else:
                ray.shutdown()


_held: list[bool] = []  # per open `one_cluster` block: whether Ray was started inside it


@contextmanager
def one_cluster() -> Iterator[None]:
    """A local Ray cluster started inside the block (by `run_on_ray`) lasts to its end, so
    the phases of one run (its SAE groups, then its layers) start Ray once; a block that
    never runs on Ray starts none."""
    _held.append(False)
    try:
        yield
    finally:
        if _held.pop():
            import ray

            ray.shutdown()


def _connect(ray: Any, execution: Execution) -> None:
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": True,
        "runtime_env": {"env_vars": env},
    }
    if execution.address is not None:
        options["address"] = execution.address
    ray.init(**options)


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
    keys: list[K],
    setup: Callable[[], Any],
    work: Callable[[Any, K], T],
    execution: Execution,
    device: str,
    done: Callable[[K, T], None],
    name: Callable[[K], str],
) -> dict[K, T]:
    """Hand items to idle workers until all have landed; replace dead workers. The
    workers are ended at the end, so the next phase's get their cores at once."""
    from ray.exceptions import RayActorError, RayTaskError

    n = min(execution.workers, len(keys)) or 1
    resources = _resources(execution, device, n)
    actor = ray.remote(max_restarts=0, max_task_retries=0, **resources)(Worker)
    threads = max(1, int(resources["num_cpus"]))
    idle = [actor.remote(setup, threads) for _ in range(n)]
    pending, attempts = deque(keys), Counter[K]()
    running: dict[Any, tuple[Any, K]] = {}
    results: dict[K, T] = {}
    try:
        while pending or running:
            while pending and idle:
                worker, key = idle.pop(), pending.popleft()
                running[worker.run.remote(key, work)] = (worker, key)
            [ref], _ = ray.wait(list(running), num_returns=1)
            worker, key = running.pop(ref)
            try:
                results[key] = ray.get(ref)
            except RayTaskError as error:  # the item itself failed: its error is the run's
                raise error.as_instanceof_cause() from None
            except RayActorError as error:
                _check_retry(error, name(key), attempts, key, execution.retries)
                print(f"coact: the worker on {name(key)} died; a new worker redoes it",
                      file=sys.stderr, flush=True)  # fmt: skip
                pending.appendleft(key)
                worker = actor.remote(setup, threads)
            else:
                done(key, results[key])
            idle.append(worker)
    finally:
        for worker in [*idle, *(worker for worker, _ in running.values())]:
            ray.kill(worker)
    return results


def _check_retry(error: Any, what: str, attempts: Counter[K], key: K, retries: int) -> None:
    """Count a dead worker's try at `key`; stop when no retry can help or none is left."""
    if getattr(error, "actor_init_failed", False):  # it never started: no retry helps
        last = str(error).strip().splitlines()[-1]
        raise CoactError(f"a Ray worker could not start: {last}") from None
    attempts[key] += 1
    if attempts[key] > retries:
        raise CoactError(
            f"{what}: {attempts[key]} workers died running it; see the Ray "
            "logs (/tmp/ray/session_latest/logs) for why"
        ) from None
