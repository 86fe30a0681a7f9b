"""`AnalyzeConfig`: what `coact analyze` runs. It is written to every run's config.json and
read back from it; a stage runs when its name is in `stages` (`coact.pipeline.stages`
lists them in data-flow order), with the settings of its own field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coact.block.stage import BlockConfig
from coact.calibrate.stage import CalibrateConfig
from coact.codes.collect import CollectConfig
from coact.connectors.config import ConnectConfig
from coact.errors import CoactError
from coact.evidence.ablation import AblationConfig
from coact.evidence.outliers import OutlierConfig
from coact.jacobian.stage import JacobianConfig
from coact.logic.stage import LabelsConfig
from coact.models.load import EMBEDDED, LoadedModel, load_model, torch_dtype
from coact.rundir.results import from_dict
from coact.sae.train import SaeTrainConfig
from coact.settings import bounded, check_ranges, setting
from coact.transcoder.stage import TranscoderConfig

# every stage of a layer, in data-flow order; the report is built last, from all of them
STAGE_NAMES = (
    "connect", "calibrate", "jacobian", "logic", "attention", "attention_calibrate", "positions",
    "attention_causal", "attention_jacobian",
    "composition", "outliers", "ablate", "transcoder", "report",
)  # fmt: skip
BLOCK_STAGES = (
    "attention", "attention_calibrate", "positions", "attention_causal", "attention_jacobian",
    "composition",
)  # fmt: skip
DEFAULT_STAGES = ("connect", "calibrate", "jacobian", "logic", "outliers", "ablate", "report")


@dataclass(frozen=True)
class AnalyzeConfig:
    model: str = setting(
        EMBEDDED, f"{EMBEDDED!r}, a tiny-* test model, a local directory or a hub id"
    )
    layer: int = setting(3, "block whose MLP is studied", low=0)
    layers: tuple[int, ...] | str | None = None  # a model run over these layers, or "all"
    corpus: str = setting(
        "embedded",
        "'embedded' (Python's docs + WikiText-2 prose, half the tokens each), 'embedded-docs', "
        "'embedded-prose', a text file or folder, a saved dataset or a hub dataset id",
    )
    tokens: int = setting(100_000, "tokens whose feature codes are stored", low=1)
    sae_tokens: int = setting(400_000, "tokens each trained SAE sees (when none is given)", low=1)
    eval_contexts: int = bounded(32, low=1)  # held-out contexts for FVE / L0 / CE recovered
    ctx_len: int = setting(128, "tokens per context, BOS included", low=2)
    seed: int = setting(0, "seed of the corpus sample and of every fit")
    device: str = setting("cpu", "torch device: cpu, cuda, cuda:1, mps")
    dtype: str = setting(
        "float32", "the model's weights: float32, or bfloat16 (halves memory; for GPUs)"
    )
    run_dir: str | None = setting(None, "default: runs/<model>-L<layer> (or -L<first>-<last>)")
    shared_dir: str | None = None  # set on a model run's layers: where sae/ and codes/ live
    sae_in: str | None = setting(None, "SAE directory for mlp_resid at --layer; trained if omitted")
    sae_out: str | None = setting(None, "SAE directory for mlp_out at --layer; trained if omitted")
    # corpus tokens before the stored codes' contexts; None: the SAE training tokens (none
    # when both SAEs are given). Given SAEs then still see codes from unseen tokens.
    code_offset_tokens: int | None = bounded(None, low=0)
    stages: tuple[str, ...] = DEFAULT_STAGES  # which stages run (see STAGE_NAMES)
    sae: SaeTrainConfig = field(default_factory=SaeTrainConfig)
    sae_group: int = bounded(16, low=1)  # SAEs trained together per pass (bounds memory)
    collect: CollectConfig = field(default_factory=CollectConfig)
    connect: ConnectConfig = field(default_factory=ConnectConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    jacobian: JacobianConfig = field(default_factory=JacobianConfig)
    logic: LabelsConfig = field(default_factory=LabelsConfig)
    block: BlockConfig = field(default_factory=BlockConfig)
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    transcoder: TranscoderConfig = field(default_factory=TranscoderConfig)  # opt-in stage
    allow_mismatch: bool = setting(
        False,
        "use a given SAE whose recorded model differs, or SAEs whose FVE is NaN or "
        "negative, with a warning (without it the run stops)",
    )
    report_features: int = setting(
        50, "output features per layer that get a page of their own", low=0
    )
    control: bool = setting(
        False,
        "also run the control: the same model re-initialised (seeded), SAEs trained by the "
        "same recipe on the same tokens, the headline stages (connect, logic, jacobian), "
        "into <run>/control/",
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        torch_dtype(self.dtype)  # an unknown name stops here, before anything loads
        if unknown := [s for s in self.stages if s not in STAGE_NAMES]:
            raise CoactError(f"unknown stages {unknown}: choose among {', '.join(STAGE_NAMES)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalyzeConfig:
        """The config a run wrote to config.json (keys it lacks take today's defaults)."""
        try:
            return from_dict(cls, data)
        except (TypeError, ValueError) as error:
            raise CoactError(
                f"the run's config.json was written by another version of coact ({error}); "
                "rerun `coact analyze` into a new run directory"
            ) from None

    def runs(self, stage: str) -> bool:
        return stage in self.stages

    def with_stages(self, add: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> AnalyzeConfig:
        """The same config with stages added or left out (kept in data-flow order)."""
        wanted = (set(self.stages) | set(add)) - set(drop)
        return dataclasses.replace(self, stages=tuple(s for s in STAGE_NAMES if s in wanted))

    def resolved(self) -> AnalyzeConfig:
        """Every stage's seed and device set to the run's, and the fits that share the
        connectors' held-out split given its fraction: set here once, not per stage."""
        replace, seed, device = dataclasses.replace, self.seed, self.device
        held = self.attention_connect.heldout_fraction
        block, attention = self.block, self.block.attention_connect
        block = replace(
            block,
            attention_connect=None
            if attention is None
            else replace(attention, seed=seed, device=device),
            positions=replace(block.positions, seed=seed, heldout_fraction=held),
            composition=replace(block.composition, seed=seed, heldout_fraction=held),
        )
        return replace(
            self,
            connect=replace(self.connect, seed=seed, device=device),
            calibrate=replace(self.calibrate, seed=seed),
            logic=replace(self.logic, seed=seed, device=device),
            block=block,
        )

    @property
    def attention_connect(self) -> ConnectConfig:
        """How the attention connectors are fitted: the MLP's settings unless set apart."""
        return self.block.attention_connect or self.connect

    def resolved_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        slug = self.model.strip("/").replace("/", "--").replace(".", "_")
        if self.layers == "all":
            return Path("runs") / f"{slug}-all"
        if self.layers:
            first, last = min(self.layers), max(self.layers)
            return Path("runs") / (f"{slug}-L{first}" + (f"-{last}" if last != first else ""))
        return Path("runs") / f"{slug}-L{self.layer}"


def parse_layers(text: str) -> tuple[int, ...] | str:
    """'all', '0-5' or '1,3,5' (ranges and lists may mix: '0-2,7')."""
    text = text.strip()
    if text == "all":
        return "all"
    layers: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, sep, hi = part.partition("-")
            layers += range(int(lo), int(hi) + 1) if sep else [int(lo)]
    except ValueError:
        raise CoactError(f"cannot read layers {text!r}: write 'all', '0-5' or '1,3,5'") from None
    if not layers:
        raise CoactError(f"no layers in {text!r}: write 'all', '0-5' or '1,3,5'")
    return tuple(sorted(set(layers)))


def run_model(config: AnalyzeConfig, device: str | None = None) -> LoadedModel:
    """The model a run's config names, with its device (or `device`), seed and dtype: one
    place, so no stage or worker loads it with a setting left out."""
    return load_model(
        config.model, device=device or config.device, seed=config.seed, dtype=config.dtype
    )
