"""`summary.json`: the typed headline of a run, built from its stages' results. A layer
run's is `RunSummary`, a model run's `ModelSummary`; the README's key table is checked
against these classes (tests/test_summary_schema.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from coact.block.stage import BlockResult
from coact.calibrate.stage import CalibrateResult
from coact.connectors.stage import ConnectResult
from coact.evidence.ablation import AblationResult
from coact.evidence.outliers import OutliersResult
from coact.jacobian.stage import JacobianResult
from coact.logic.stage import LogicResult
from coact.pipeline.control_figures import ControlSummary
from coact.rundir.results import Result
from coact.sae.evaluate import SaeReport
from coact.transcoder.stage import TranscoderResult


@dataclass(frozen=True, kw_only=True)
class SiteSummary(SaeReport, Result):
    """One site's SAE: where it came from, its width and its evaluation on held-out
    contexts (FVE, L0, dead latents, next-token loss clean / spliced / zero-ablated)."""

    sae: str  # the path given (--sae-in/--sae-out) or the trained one
    width: int

    @classmethod
    def of(cls, sae: str, width: int, report: SaeReport) -> SiteSummary:
        evaluated = {k: v for k, v in asdict(report).items() if k != "ce_recovered"}
        return cls(sae=sae, width=width, **evaluated)


@dataclass(frozen=True, kw_only=True)
class CodesSummary(Result):
    """The code store and its size per token (stored, ideal and dense float32 bytes)."""

    directory: str
    bytes_per_token: dict[str, dict[str, float]]


@dataclass(frozen=True, kw_only=True)
class RunSummary(Result):
    """One layer's run: what ran, on how many tokens, and every stage's headline (None
    where a stage was left out)."""

    model: str
    layer: int
    corpus: str
    run_dir: str
    tokens: int
    saes_trained_now: list[str]
    saes_evaluated_now: list[str]
    sites: dict[str, SiteSummary]
    codes: CodesSummary
    connect: ConnectResult | None = None
    calibrate: CalibrateResult | None = None
    jacobian: JacobianResult | None = None
    logic: LogicResult | None = None
    block: BlockResult | None = None
    outliers: OutliersResult | None = None
    ablation: AblationResult | None = None
    transcoder: TranscoderResult | None = None  # the opt-in metric sheet: SAE route vs transcoder
    control: ControlSummary | None = None  # the headlines beside the re-initialised model's
    timings: dict[str, float]
    report: str | None = None  # the report's index.html
    # what --allow-mismatch let through (an SAE of another model, NaN or negative FVE)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class ModelSummary(Result):
    """A model run (`coact analyze --layers …`): its layers, where each one's run lives,
    and the model report."""

    model: str
    layers: list[int]
    run_dir: str
    tokens: int
    saes_trained_now: list[str]
    layers_finished_before: list[int]
    layer_runs: dict[str, str]
    timings: dict[str, float]
    report: str | None = None
