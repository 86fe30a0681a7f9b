"""A model run's SAE groups and layers on a local Ray cluster, and two processes on one run
directory: every way ends with the files of a serial run (timings and the run's own path
aside). Each run is the cheapest with every layer stage and a report
(`tests/fast_model_run.py`), its SAEs trained one per pass (`SAE_GROUP`), so that two
workers share them out; every process runs one thread, as Ray's workers do, so the floats
agree to the bit. The runs take minutes, not seconds: those tests are marked slow."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import coact.pipeline.run as pipeline
import coact.pipeline.shared as shared_steps
from coact.errors import CoactError
from coact.models.load import load_model
from coact.models.sites import Site
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.executor import Execution
from coact.pipeline.run import analyze
from coact.pipeline.summary import ModelSummary
from coact.rundir.claims import Claim
from coact.rundir.layout import RunLayout
from coact.sae.formats import load_sae
from tests.fast_model_run import LAYERS, differences, fast_model_config, run_tree

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SAE_GROUP = 1  # SAEs per training pass: one group per site, several for the workers
SHARED = ("config.json", "sae", "sae_eval", "codes")  # what a model run's layers share
# one process of a two-process trial: the fast model run into argv[1] (argv[2]: wait or not)
ANALYZE = """
import sys
from coact.errors import CoactError
from coact.errors import CoactError
from coact.pipeline.executor import Execution
from coact.pipeline.run import analyze
from coact.pipeline.summary import ModelSummary
from tests.test_executor import config
try:
    analyze(config(sys.argv[1]), Execution(wait=sys.argv[2] == "wait"))
except CoactError as error:
    print(f"declined: {error}", file=sys.stderr)
    sys.exit(2)
"""


def config(run: str | Path, **overrides: Any) -> AnalyzeConfig:
    """The fast model run, `SAE_GROUP` SAEs per training pass."""
    return fast_model_config(run, **{"sae_group": SAE_GROUP, **overrides})


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the fast model run, serially, in a one-thread process."""
    run = tmp_path_factory.mktemp("serial") / "run"
    code, output = _finished(_process(run, "wait"))
    assert code == 0 and (run / "report" / "site" / "index.html").is_file(), output[-3000:]
    return run


Started = tuple[subprocess.Popen[bytes], Path]  # a process and the file of its output


def _process(run: Path, mode: str) -> Started:
    """A one-thread process running the fast model run into `run` (`mode`: wait or not);
    its output goes to a file beside `run` (a pipe nobody reads could stall it)."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO)}
    log = run.parent / f"{run.name}-{mode}-{len(list(run.parent.glob('*.log')))}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", ANALYZE, str(run), mode],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return process, log


def _finished(started: Started) -> tuple[int, str]:
    """The exit status and output of a `_process`."""
    process, log = started
    return process.wait(timeout=900), log.read_text()


def _shared_copy(serial: Path, run: Path) -> None:
    """A run directory holding the serial run's SAEs, their evaluations and codes: what is
    left is the layers' stages and the reports."""
    run.mkdir(parents=True)
    for name in SHARED:
        source = serial / name
        if source.is_dir():
            shutil.copytree(source, run / name)
        else:
            shutil.copy2(source, run / name)


def _dies_once_holding(layer: int, marker: Path) -> Callable[[Any, int], Any]:
    """The Ray workers' work, except that the first worker given `layer` takes its claim
    and is killed (SIGKILL) holding it."""
    real = pipeline._layer_on_worker

    def work(state: Any, at: int) -> Any:
        if at == layer and not marker.exists():
            marker.touch()
            model = state[3]
            Claim(model.claims, RunLayout.layer_name.format(layer=at)).acquire()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(state, at)

    return work


def _group_dies_once_holding(index: int, marker: Path, record: Path) -> Callable[[Any, int], Any]:
    """The Ray workers' SAE training, each group's index, pid and sites trained appended
    to `record`; the first worker given group `index` takes its claim and is killed
    (SIGKILL) holding it."""
    real = shared_steps._group_on_worker

    def work(worker: Any, at: int) -> Any:
        if at == index and not marker.exists():
            marker.touch()
            Claim(worker.layout.claims, shared_steps.group_claim(worker.groups[at])).acquire()
            os.kill(os.getpid(), signal.SIGKILL)
        trained = real(worker, at)
        with record.open("a") as out:
            out.write(f"{at} {os.getpid()} {len(trained)}\n")
        return trained

    return work


@pytest.fixture
def one_thread_driver() -> Iterator[None]:
    """This process at one thread (torch, numba, BLAS), as the serial reference and the
    workers run: the driver evaluates the SAEs and collects the codes."""
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads(), numba.get_num_threads()
    with threadpool_limits(1):
        torch.set_num_threads(1)
        numba.set_num_threads(1)
        yield
    torch.set_num_threads(threads[0])
    numba.set_num_threads(threads[1])


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread_driver")
def test_ray_workers_train_the_saes_and_run_the_layers_as_the_serial_run_does(
    serial: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Two workers train the SAE groups and run the layers; a worker killed in a group and
    one killed in a layer have their work redone; the files are the serial run's, and a
    rerun trains nothing."""
    run, record = tmp_path / "run", tmp_path / "groups.txt"
    killed_group, killed_layer = tmp_path / "killed-group", tmp_path / "killed-layer"
    monkeypatch.setattr(
        shared_steps, "_group_on_worker", _group_dies_once_holding(1, killed_group, record)
    )
    monkeypatch.setattr(pipeline, "_layer_on_worker", _dies_once_holding(1, killed_layer))
    for name, value in ONE_THREAD.items():
        monkeypatch.setenv(name, value)
    summary = analyze(config(run), Execution(executor="ray", workers=2))
    err = capfd.readouterr().err
    assert killed_group.exists() and killed_layer.exists(), "no worker was killed"
    assert "coact: the worker on SAE group 1 (" in err and "coact: taking over the SAEs at " in err
    assert "coact: the worker on layer 1 died; a new worker redoes it" in err
    assert "coact: taking over layer 1 of " in err  # the dead worker's claim, taken over
    rows = [tuple(map(int, line.split())) for line in record.read_text().splitlines()]
    sites = sorted(path.name for path in (serial / "sae").iterdir())
    assert sorted(group for group, _, _ in rows) == list(range(len(sites)))  # each once
    assert all(trained == SAE_GROUP for _, _, trained in rows)
    pids = {pid for _, pid, _ in rows}
    assert len(pids) >= 2 and os.getpid() not in pids  # on the workers, not here
    assert isinstance(summary, ModelSummary) and list(summary.layers) == list(LAYERS)
    assert len(summary.saes_trained_now) == len(sites)
    assert differences(run_tree(serial), run_tree(run)) == []

    again = analyze(config(run), Execution(executor="ray", workers=2))
    assert again.saes_trained_now == [] and len(record.read_text().splitlines()) == len(rows)
    assert differences(run_tree(serial), run_tree(run)) == []


@pytest.mark.slow
def test_a_worker_skips_a_group_another_writer_trained(serial: Path, tmp_path: Path) -> None:
    """A group handed out while another writer finished it is read, not trained again."""
    run = tmp_path / "run"
    _shared_copy(serial, run)
    site = sorted((run / "sae").iterdir())[0]
    before = (site / "train_log.json").stat().st_mtime_ns
    recipe = load_sae(site).metadata["recipe"]
    layout = RunLayout(run, run)
    groups = [[Site.parse(site.name)]]
    settings = config(run).resolved()
    lm = load_model(settings.model, seed=settings.seed)
    contexts = shared_steps.run_contexts(settings, lm)[0]
    worker = shared_steps._group_worker(settings, contexts, layout, recipe, groups, True)
    assert shared_steps._group_on_worker(worker, 0) == []
    assert (site / "train_log.json").stat().st_mtime_ns == before


def _trial(run: Path, second_waits: bool) -> list[tuple[int, str]]:
    """Two processes started together on one run directory: (exit status, output) each."""
    processes = [_process(run, mode) for mode in ("wait", "wait" if second_waits else "no-wait")]
    return [_finished(process) for process in processes]


@pytest.mark.slow
@pytest.mark.parametrize("second_waits", [True, False], ids=["both-wait", "one-may-decline"])
def test_two_processes_on_one_run_directory_end_with_the_serial_files(
    serial: Path, tmp_path: Path, second_waits: bool
) -> None:
    """Both processes finish (the layers shared out between them), or the one told not to
    wait declines in one line; the run ends complete, with a serial run's files."""
    run = tmp_path / "run"
    _shared_copy(serial, run)
    (first, first_output), (second, second_output) = _trial(run, second_waits)
    assert first == 0, first_output[-3000:]
    if second != 0:
        assert not second_waits and second == 2, second_output[-3000:]
        declined = [line for line in second_output.splitlines() if line.startswith("declined")]
        # the holder named by pid, or (caught before it wrote its record) as another process
        assert len(declined) == 1 and " is being written by " in declined[0]
    assert differences(run_tree(serial), run_tree(run)) == []
    assert not list(run.rglob("*.holder.json"))  # every claim was released


def test_workers_need_a_model_run_and_sane_settings(tmp_path: Path) -> None:
    """Checked before anything loads or is written."""
    with pytest.raises(CoactError, match=r"run a model run's layers: give --layers"):
        analyze(fast_model_config(tmp_path / "run", layers=None), Execution(workers=2))
    assert not (tmp_path / "run").exists()
    with pytest.raises(CoactError, match="unknown executor 'dask'"):
        Execution(executor="dask")
    with pytest.raises(CoactError, match="--workers must be at least 1, got 0"):
        Execution(workers=0)
    assert not Execution().on_ray and Execution(workers=2).on_ray
    assert Execution(executor="ray").on_ray and Execution(address="auto").on_ray
