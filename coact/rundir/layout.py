"""Every file name of a run directory, in one place: stages and the report ask here for
paths, nothing else spells a file name.

A run directory holds a config, a summary and one folder per stage. Each stage folder has
its headline JSON (written last, so its presence marks the stage finished) and its tables.
A single-layer run keeps what its layers would share (SAEs, their evaluations, the code
store) in its own directory; the layers of a model run (`coact analyze --layers …`) share
one set in the model run's directory, and each layer's `config.json` names it
(`shared_dir`, relative to the layer's directory).

    <run>/config.json  summary.json  block.json  layers.parquet (a model run)  L<ℓ>/
    <shared>/sae/<site>/  sae_eval/<site>.json  codes/
    <run>/connect/  calibrate/  jacobian/  logic/  outliers/  evidence/  transcoder/
    <run>/attention/connect/  attention/calibrate/  attention/positions/  attention/causal/
    <run>/attention/jacobian/
    <run>/composition/  report/  graph/  control/ (a run directory: the control)  causal/
    <run>/.claims/<stage, layer or step>.lock  .holder.json (while a writer holds it)

Formats defined elsewhere keep their own names: an SAE directory follows SAELens, sparsify
or dictionary_learning (`coact.sae.formats`), a model directory Hugging Face's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from coact.errors import CoactError

CONFIG = "config.json"
F = TypeVar("F")
SUMMARY = "summary.json"


class Table:
    """A stage's table: `<stage folder>/<stem>.parquet`, read as an attribute."""

    def __init__(self, stem: str) -> None:
        self.stem = stem

    def __get__(self, files: StageFiles | None, owner: type) -> Path:
        if files is None:
            raise AttributeError(f"{owner.__name__}'s tables are read on an instance")
        return files.table(self.stem)


@dataclass(frozen=True)
class StageFiles:
    """A stage's folder: `result` is its headline JSON, `tables` what must exist beside it
    for a finished result to be reused."""

    path: Path
    result_name: ClassVar[str] = ""
    table_names: ClassVar[tuple[str, ...]] = ()

    @property
    def result(self) -> Path:
        return self.path / self.result_name

    @property
    def tables(self) -> tuple[Path, ...]:
        return tuple(self.path / name for name in self.table_names)

    def table(self, stem: str) -> Path:
        return self.path / f"{stem}.parquet"

    stamp_name: ClassVar[str] = ".files.json"

    @property
    def stamp(self) -> Path:
        """Size, time and sha256 of every file the stage wrote (`coact.rundir.verify`)."""
        return self.path / self.stamp_name

    @property
    def backup(self) -> Path:
        """The previous results, kept beside the folder while the stage reruns."""
        return self.path.with_name(f".{self.path.name}.prev")


@dataclass(frozen=True)
class ConnectFiles(StageFiles):
    """`connect`: the α sweep, connections, linearity table, top tokens, the mlp's curve,
    d's per-context error sums and the fitted connectors."""

    result_name: ClassVar[str] = "connect.json"
    table_names: ClassVar[tuple[str, ...]] = (
        "sweep.parquet", "weights.parquet", "features.parquet", "top_tokens.parquet",
        "mlp_curve.parquet", "linearity_contexts.npz", "linearity_connectors.safetensors",
    )  # fmt: skip

    sweep = Table("sweep")

    weights = Table("weights")

    features = Table("features")

    top_tokens = Table("top_tokens")

    mlp_curve = Table("mlp_curve")

    @property
    def heldout_contexts(self) -> Path:
        return self.path / "linearity_contexts.npz"

    @property
    def connectors(self) -> Path:
        return self.path / "linearity_connectors.safetensors"


@dataclass(frozen=True)
class CalibrateFiles(StageFiles):
    """`calibrate`: noise curves, splices, the table at the calibrated τ, the causal check."""

    result_name: ClassVar[str] = "calibrate.json"
    table_names: ClassVar[tuple[str, ...]] = (
        "noise.parquet",
        "splices.parquet",
        "linearity.parquet",
    )

    noise = Table("noise")

    splices = Table("splices")

    linearity = Table("linearity")

    causal = Table("causal")


@dataclass(frozen=True)
class LogicFiles(StageFiles):
    """`logic`: labels, truth tables, co-activation modes, supernodes (groups of features
    sharing inputs and computation), the sae-connector's latents."""

    result_name: ClassVar[str] = "logic.json"
    table_names: ClassVar[tuple[str, ...]] = (
        "features.parquet", "truth_tables.parquet", "clusters.parquet", "supernodes.parquet",
    )  # fmt: skip

    features = Table("features")

    truth_tables = Table("truth_tables")

    clusters = Table("clusters")

    supernodes = Table("supernodes")

    hidden = Table("hidden")


@dataclass(frozen=True)
class JacobianFiles(StageFiles):
    """`jacobian`: the block's own Jacobian per connection, per output feature its
    linearity score and formula, and the three-way agreement of strong connections."""

    result_name: ClassVar[str] = "jacobian.json"
    table_names: ClassVar[tuple[str, ...]] = (
        "connections.parquet",
        "features.parquet",
        "agreement.parquet",
    )

    connections = Table("connections")

    features = Table("features")

    agreement = Table("agreement")


@dataclass(frozen=True)
class TranscoderFiles(StageFiles):
    """`transcoder`: the metric sheet (SAE route vs skip transcoder, one row per route),
    the transcoder itself (in sparsify's format, a folder per hookpoint under `coders/`)
    and its training curve."""

    result_name: ClassVar[str] = "transcoder.json"
    table_names: ClassVar[tuple[str, ...]] = ("sheet.parquet",)

    sheet = Table("sheet")

    @property
    def coders(self) -> Path:
        return self.path / "coders"

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.json"

    @property
    def labels(self) -> Path:
        """The logic stage's features table for the transcoder's latents (when labelled)."""
        return self.path / "labels.parquet"


@dataclass(frozen=True)
class OutlierFiles(StageFiles):
    """`outliers`: per site and feature, its artefact shares and flag."""

    result_name: ClassVar[str] = "outliers.json"
    table_names: ClassVar[tuple[str, ...]] = ("outliers.parquet",)

    outliers = Table("outliers")


@dataclass(frozen=True)
class AblationFiles(StageFiles):
    """`ablate`: the activation when each preceding token is removed or replaced."""

    result_name: ClassVar[str] = "ablation.json"
    table_names: ClassVar[tuple[str, ...]] = ("ablation.parquet",)

    ablation = Table("ablation")


@dataclass(frozen=True)
class PositionsFiles(StageFiles):
    """`positions`: per attention feature, the gain from earlier positions."""

    result_name: ClassVar[str] = "positions.json"
    table_names: ClassVar[tuple[str, ...]] = ("positions.parquet",)

    positions = Table("positions")


@dataclass(frozen=True)
class AttentionCausalFiles(StageFiles):
    """`attention_causal`: per attention feature, self-only attention and resampled context."""

    result_name: ClassVar[str] = "causal.json"
    table_names: ClassVar[tuple[str, ...]] = ("causal.parquet",)

    causal = Table("causal")


@dataclass(frozen=True)
class CausalFiles(StageFiles):
    """A control run's causal check of its strong connections (it runs no calibrate
    stage, whose check this is elsewhere): the table and its headline."""

    result_name: ClassVar[str] = "causal.json"
    table_names: ClassVar[tuple[str, ...]] = ("causal.parquet",)

    causal = Table("causal")


@dataclass(frozen=True)
class CompositionFiles(StageFiles):
    """`composition`: the next stream from the block's sources, and the decoded check."""

    result_name: ClassVar[str] = "composition.json"
    table_names: ClassVar[tuple[str, ...]] = (
        "composition.parquet", "composition_weights.parquet", "composition_sweep.parquet",
    )  # fmt: skip

    features = Table("composition")

    weights = Table("composition_weights")

    sweep = Table("composition_sweep")

    decoded = Table("decoded")


@dataclass(frozen=True)
class CodesFiles:
    """The code store: a manifest, the token table's shards and each site's CSR shards."""

    path: Path

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    @property
    def stamp(self) -> Path:
        """Size and time of each shard when its checksum last held (`coact.rundir.verify`)."""
        return self.path / ".verified.json"

    @staticmethod
    def shard(folder: str, index: int) -> str:
        """A shard's path relative to the store (the manifest records it so)."""
        return f"{folder}/shard-{index:05d}.safetensors"


@dataclass(frozen=True)
class ReportFiles:
    """The report: markdown pages in `docs/`, the built site in `site/` (staged aside in
    `site.tmp` and swapped in whole), and a marker that says the folder is a report's."""

    path: Path
    marker_name: ClassVar[str] = ".coact-report"

    @property
    def docs(self) -> Path:
        return self.path / "docs"

    @property
    def site(self) -> Path:
        return self.path / "site"

    @property
    def staging(self) -> Path:
        return self.path / "site.tmp"

    @property
    def index(self) -> Path:
        return self.site / "index.html"

    @property
    def marker(self) -> Path:
        return self.path / self.marker_name

    @property
    def mkdocs(self) -> Path:
        return self.path / "mkdocs.yml"

    @property
    def inputs(self) -> Path:
        """The fingerprint of what the report was built from: unchanged, it is not rebuilt."""
        return self.path / ".inputs.sha256"


@dataclass(frozen=True)
class ClaimFiles:
    """Claims on a run directory (`coact.rundir.claims`): per stage, layer or shared step,
    a lock file and a record of its holder (pid, host, start time)."""

    path: Path

    def lock(self, name: str) -> Path:
        return self.path / f"{name}.lock"

    def holder(self, name: str) -> Path:
        return self.path / f"{name}.holder.json"


@dataclass(frozen=True)
class GraphFiles:
    """`coact graph`: one feature's layer graph, as edge and node tables and a chart."""

    path: Path

    def stem(self, slug: str, feature: int) -> Path:
        return self.path / f"graph_{slug}_{feature}"

    def edges(self, slug: str, feature: int) -> Path:
        return self.path / f"graph_{slug}_{feature}_edges.parquet"

    def nodes(self, slug: str, feature: int) -> Path:
        return self.path / f"graph_{slug}_{feature}_nodes.parquet"

    def edges_csv(self, slug: str, feature: int) -> Path:
        return self.path / f"graph_{slug}_{feature}_edges.csv"


class Under(Generic[F]):
    """A path of a run, `<run>/<parts>` (or `<shared>/<parts>`), read as an attribute of
    its layout and handed out as `files` (a Path, or a stage's files)."""

    def __init__(self, files: Callable[[Path], F], *parts: str, shared: bool = False) -> None:
        self.files, self.parts, self.shared = files, parts, shared

    def __get__(self, layout: RunLayout | None, owner: type) -> F:
        if layout is None:
            raise AttributeError("a run's paths are read on its layout")
        return self.files(
            (layout.shared_dir if self.shared else layout.run_dir).joinpath(*self.parts)
        )


@dataclass(frozen=True)
class RunLayout:
    """Where everything of one run lives (a single layer, a model run or one of its layers)."""

    run_dir: Path
    shared_dir: Path  # holds sae/, sae_eval/ and codes/

    @classmethod
    def of(cls, run_dir: str | Path, config: dict[str, Any] | None = None) -> RunLayout:
        """The layout a run's config.json (or the given config) records."""
        run = Path(run_dir)
        if config is None:
            config = read_run_config(run) if (run / CONFIG).is_file() else {}
        shared = config.get("shared_dir")
        return cls(run, (run / shared) if shared else run)

    # the run's own files, its stages' folders, and (`shared=True`) what its layers share
    config = Under(Path, CONFIG)
    summary = Under(Path, SUMMARY)
    block = Under(Path, "block.json")  # the block stages' headline
    layers_table = Under(Path, "layers.parquet")  # a model run's layers side by side
    codes = Under(Path, "codes", shared=True)
    sae = Under(Path, "sae", shared=True)
    sae_eval = Under(Path, "sae_eval", shared=True)
    connect = Under(ConnectFiles, "connect")
    calibrate = Under(CalibrateFiles, "calibrate")
    logic = Under(LogicFiles, "logic")
    jacobian = Under(JacobianFiles, "jacobian")
    outliers = Under(OutlierFiles, "outliers")
    ablation = Under(AblationFiles, "evidence")
    attention_connect = Under(ConnectFiles, "attention", "connect")
    attention_calibrate = Under(CalibrateFiles, "attention", "calibrate")
    positions = Under(PositionsFiles, "attention", "positions")
    attention_causal = Under(AttentionCausalFiles, "attention", "causal")
    attention_jacobian = Under(JacobianFiles, "attention", "jacobian")  # attention's own Jacobian
    composition = Under(CompositionFiles, "composition")
    transcoder = Under(TranscoderFiles, "transcoder")  # SAE route vs skip transcoder
    report = Under(ReportFiles, "report")
    graph = Under(GraphFiles, "graph")
    claims = Under(ClaimFiles, ".claims")  # who writes what now (coact.rundir.claims)
    control = Under(Path, "control")  # the control run (re-initialised model): a run directory
    causal = Under(CausalFiles, "causal")  # a control run's causal check

    def sae_dir(self, slug: str) -> Path:
        return self.sae / slug

    def train_log(self, slug: str) -> Path:
        return self.sae / slug / "train_log.json"

    def sae_evaluation(self, slug: str) -> Path:
        return self.sae_eval / f"{slug}.json"

    layer_name: ClassVar[str] = "L{layer}"

    def layer_dir(self, layer: int | str) -> Path:
        """A model run's layer: an ordinary run directory inside the model run's."""
        return self.run_dir / self.layer_name.format(layer=layer)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """A run's config.json, or one clear error saying why the directory is not a run (a
    file, no config.json, or a config.json that is not a JSON object)."""
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise CoactError(f"{run} is a file, not a run directory; give the run's directory")
    path = run / CONFIG
    if not path.is_file():
        raise CoactError(f"{run_dir} is not a run directory (no config.json); run `coact analyze`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CoactError(
            f"corrupt {path} ({error}); restore it or rerun `coact analyze` into a new "
            "run directory"
        ) from None
    if not isinstance(data, dict):
        raise CoactError(f"corrupt {path}: expected a JSON object; restore it or rerun analyze")
    return dict(data)
