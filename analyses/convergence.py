"""Convergence: do the headline figures of a layer settle as the budgets double?

A headline (a linear share, an NMSE, an agreement) means little unless more data would
not move it. This study reruns `coact analyze` (connect, calibrate, jacobian: the stages
the figures come from) on the embedded default, SmolLM2-135M block 3, at doubling budgets:

- the code ladder: tokens whose feature codes are stored, 25k → 800k, with the SAEs fixed
  (trained once, at the default 400k SAE tokens, by the ladder's first step; the later
  steps are given them as `sae_in`/`sae_out`, and their codes start after the same 400k
  training tokens, so every step encodes tokens its SAEs never saw, nested: a larger step
  holds a smaller one's tokens);
- the SAE ladder: tokens each SAE is trained on, 100k → 800k, at the default 100k code
  tokens, always the same ones (after the ladder's largest training budget, so no step's
  codes overlap its SAEs' training tokens).

A figure has settled when the last doubling moved it by less than its interval
(`settled`): the previous step's value lies inside the last step's interval — d's
noise-floor bracket for linear shares, the Wilson 95 % interval for shares of n features
or connections — or, for a figure without one (the NMSEs, the median nonlinearity),
within 5 % of the larger of the two values (the relative tolerance the control uses).

Each step is its own run directory under `--root` (default runs/convergence/): a
finished step is read back, an unfinished one resumes where it stopped (the pipeline
reuses finished stages). Results: analyses/results/convergence.json (every step's
figures, budgets and seconds, and per figure the verdict of the last doubling and of the
doubling that ends at the defaults), the chart docs/convergence.png and the page
docs/convergence.md (`plot_convergence.py` redraws both from the JSON).

    python analyses/convergence.py --ladder code --max-code-tokens 400000
    python analyses/convergence.py --quick   # tiny-llama, about a minute: a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from coact.calibrate.stage import CalibrateConfig
from coact.codes.collect import CollectConfig
from coact.connectors.config import MLP_FIT, ConnectConfig
from coact.connectors.exact import LassoPathConfig
from coact.errors import CoactError
from coact.jacobian.stage import JacobianConfig
from coact.linearity.table import SEED_TAU, LinearShare
from coact.models.sites import Site
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.control_figures import NMSE_TOLERANCE, wilson
from coact.pipeline.summary import RunSummary
from coact.rundir.files import read_json, write_json
from coact.rundir.layout import RunLayout
from coact.rundir.results import Result
from coact.sae.train import SaeTrainConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "analyses" / "results" / "convergence.json"
CHART = ROOT / "docs" / "convergence.png"
PAGE = ROOT / "docs" / "convergence.md"
STAGES = ("connect", "calibrate", "jacobian")  # the stages the figures come from
CODE_LADDER = (25_000, 50_000, 100_000, 200_000, 400_000, 800_000)
SAE_LADDER = (100_000, 200_000, 400_000, 800_000)
QUICK_CODE_LADDER = (1_000, 2_000, 4_000)
QUICK_SAE_LADDER = (1_500, 3_000, 6_000)

NOISE_FLOOR = "d's noise-floor bracket (95 % bootstrap over held-out contexts)"
WILSON = "Wilson 95 % interval of the proportion"
TOLERANCE = f"relative tolerance {100 * NMSE_TOLERANCE:g} % (the figure has no interval)"
# name: (what it is, unit, the interval the settled rule uses)
FIGURES: dict[str, tuple[str, str, str]] = {
    "linear_share_seed_tau": (
        f"linear share at the seed's τ = {SEED_TAU:g} (of alive features)", "%", NOISE_FLOOR
    ),
    "linear_share_calibrated_tau": (
        "linear share at the calibrated τ (of alive features)", "%", NOISE_FLOOR
    ),
    "jacobian_share_linear": (
        "Jacobian linearity score: features linear (of scored features)", "%", WILSON
    ),
    "jacobian_share_nonlinear": (
        "Jacobian linearity score: features nonlinear (of scored features)", "%", WILSON
    ),
    "jacobian_median_nonlinearity": (
        "Jacobian linearity score: median nonlinearity", "", TOLERANCE
    ),
    "mlp_beats_linear": (
        "mlp beats least squares beyond d's noise floor (of alive features)", "%", WILSON
    ),
    "connector_nmse_sparse": ("held-out NMSE (FVU) of the sparse connector", "", TOLERANCE),
    "connector_nmse_linear": ("held-out NMSE (FVU) of least squares", "", TOLERANCE),
    "connector_nmse_mlp": ("held-out NMSE (FVU) of the mlp", "", TOLERANCE),
    "agreement_jacobian_size": (
        "Jacobian's size within 2× of the ablation (of judged strong connections)", "%", WILSON
    ),
    "agreement_connector_size": (
        "connector's size within 2× of the ablation (of judged strong connections)", "%", WILSON
    ),
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class FigureValue(Result):
    """One figure of one step, with its interval where it has one (None: judged by the
    relative tolerance) and the count a Wilson interval rests on."""

    value: float | None
    low: float | None = None
    high: float | None = None
    n: int | None = None


@dataclass(frozen=True, kw_only=True)
class Step(Result):
    """One run of a ladder: its budget, what it stored, its seconds and its figures."""

    budget: int  # the ladder's budget: code tokens or SAE tokens
    run_dir: str
    tokens: int  # tokens whose codes were stored
    sae_tokens: int  # tokens each SAE was trained on
    code_offset_tokens: int  # corpus tokens before the codes
    seconds: float  # the run's total (its last call, when it resumed)
    timings: dict[str, float]
    reused: bool  # a finished step read back, not rerun
    tau: float | None  # the calibrated τ
    figures: dict[str, FigureValue]
    heldout_tokens: int | None = None  # the connectors' held-out tokens (d is measured on)
    mlp_epochs_run: int | None = None  # how the mlp fit d compares with least squares ran
    mlp_best_epoch: int | None = None
    # connect's and calibrate's own seconds, measured when they ran (kept when reused)
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Verdict(Result):
    """Whether one doubling left a figure settled, with the numbers it was judged on."""

    budgets: list[int]  # the doubling judged: previous, last
    previous: float | None
    last: float | None
    move: float | None  # last − previous
    low: float | None  # the last step's interval
    high: float | None
    tolerance: float | None  # relative, where the figure has no interval
    settled: bool | None  # None: a value is missing


@dataclass(frozen=True, kw_only=True)
class Ladder(Result):
    """One ladder: its planned budgets, the steps that ran, and per figure the verdict of
    the last doubling and of the doubling that ends at the default budget."""

    budget: str  # "tokens" (code tokens) or "sae_tokens"
    default: int
    planned: list[int]
    steps: list[Step]
    failed: dict[str, str]  # budget: the error that stopped it
    last: dict[str, Verdict]
    at_default: dict[str, Verdict]


@dataclass(frozen=True, kw_only=True)
class Convergence(Result):
    """The whole study as written to convergence.json."""

    model: str
    layer: int
    corpus: str
    quick: bool
    root: str
    stages: list[str]
    rule: str
    figures: dict[str, dict[str, str]]  # name: label, unit, basis
    ladders: dict[str, Ladder]
    command: str  # the command that runs the whole study


RULE = (
    "settled when the last doubling moved the figure by less than its interval: the "
    "previous step's value lies inside the last step's interval (bounds included); for a "
    f"figure without one, when the two differ by at most {100 * NMSE_TOLERANCE:g} % of the "
    "larger magnitude"
)


def settled(
    previous: float | None,
    last: float | None,
    low: float | None = None,
    high: float | None = None,
    tolerance: float | None = NMSE_TOLERANCE,
) -> bool | None:
    """The rule: True when the doubling from `previous` to `last` stayed inside the last
    step's interval [low, high], or, without one, within `tolerance` of the larger
    magnitude; None when a value (or the interval and the tolerance) is missing."""
    if previous is None or last is None or not math.isfinite(previous + last):
        return None
    if low is not None and high is not None and math.isfinite(low + high):
        slack = 1e-9 * max(1.0, abs(low), abs(high))  # a bound computed two ways may differ
        return low - slack <= previous <= high + slack
    if tolerance is None:
        return None
    return abs(last - previous) <= tolerance * max(abs(last), abs(previous))


def verdict(before: Step, after: Step, name: str) -> Verdict:
    """The rule applied to one figure over one doubling."""
    a, b = before.figures.get(name), after.figures.get(name)
    previous = a.value if a is not None else None
    last = b.value if b is not None else None
    low, high = (b.low, b.high) if b is not None else (None, None)
    tolerance = NMSE_TOLERANCE if FIGURES[name][2] == TOLERANCE else None
    move = last - previous if previous is not None and last is not None else None
    return Verdict(
        budgets=[before.budget, after.budget], previous=previous, last=last, move=move,
        low=low, high=high, tolerance=tolerance,
        settled=settled(previous, last, low, high, tolerance),
    )  # fmt: skip


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _share(share: LinearShare) -> FigureValue:
    """Percent linear with d's noise-floor bracket (Wilson where the table has none)."""
    low, high = share.percent_linear_confident, share.percent_linear_possible
    if low is None or high is None:
        lo, hi = wilson(share.linear, share.alive)
        low, high = 100 * lo, 100 * hi
    return FigureValue(
        value=_finite(share.percent_linear), low=_finite(low), high=_finite(high), n=share.alive
    )


def _proportion(share: float, n: int) -> FigureValue:
    """A share (0..1) of n things in percent, with its Wilson 95 % interval."""
    if n <= 0 or not math.isfinite(share):
        return FigureValue(value=None, n=n)
    lo, hi = wilson(round(share * n), n)
    return FigureValue(value=100 * share, low=100 * lo, high=100 * hi, n=n)


def figures_of(summary: RunSummary) -> dict[str, FigureValue]:
    """The study's figures from one run's summary (a stage left out gives none)."""
    out: dict[str, FigureValue] = {}
    connect, calibrate, jacobian = summary.connect, summary.calibrate, summary.jacobian
    if connect is not None:
        seed_share = connect.share if connect.tau == SEED_TAU else None
        if calibrate is not None:
            seed_share = calibrate.linear_seed_tau
        if seed_share is not None:
            out["linear_share_seed_tau"] = _share(seed_share)
        gains = connect.share.mlp_gain_beyond_noise
        if gains is not None and connect.share.alive:
            out["mlp_beats_linear"] = _proportion(gains / connect.share.alive, connect.share.alive)
        for fit in ("sparse", "linear", "mlp"):
            nmse = _finite(getattr(connect, f"heldout_nmse_{fit}"))
            out[f"connector_nmse_{fit}"] = FigureValue(value=nmse)
    if calibrate is not None:
        out["linear_share_calibrated_tau"] = _share(calibrate.linear_calibrated)
    if jacobian is not None:
        n = jacobian.features_scored
        out["jacobian_share_linear"] = _proportion(jacobian.share_linear, n)
        out["jacobian_share_nonlinear"] = _proportion(jacobian.share_nonlinear, n)
        median = _finite(jacobian.median_nonlinearity)
        out["jacobian_median_nonlinearity"] = FigureValue(value=median)
        if jacobian.agreement is not None:
            judged = jacobian.agreement.judged
            for name in ("jacobian_size", "connector_size"):
                share = getattr(jacobian.agreement, name)
                out[f"agreement_{name}"] = _proportion(share, judged)
    return out


def verdicts(steps: list[Step], default: int) -> tuple[dict[str, Verdict], dict[str, Verdict]]:
    """Per figure, the verdict of the last doubling and of the one ending at `default`
    (empty where fewer than two steps, or not the default and the step before it, ran)."""
    last = {n: verdict(steps[-2], steps[-1], n) for n in FIGURES} if len(steps) > 1 else {}
    at = [i for i, s in enumerate(steps) if s.budget == default and i > 0]
    at_default = {n: verdict(steps[at[0] - 1], steps[at[0]], n) for n in FIGURES} if at else {}
    return last, at_default


def quick_config() -> AnalyzeConfig:
    """The smoke test's base: tiny-llama block 1, small SAEs and fits (seconds a step)."""
    return AnalyzeConfig(
        model="tiny-llama", layer=1, tokens=2_000, sae_tokens=3_000, eval_contexts=4, ctx_len=32,
        sae=SaeTrainConfig(k=8, buffer_contexts=16, batch_tokens=128),
        collect=CollectConfig(forward_batch=8, shard_contexts=16),
        connect=ConnectConfig(
            path=LassoPathConfig(n_alphas=6), mlp=replace(MLP_FIT, hidden=64, epochs=2),
            progress=False,
        ),
        calibrate=CalibrateConfig(
            contexts=4, max_contexts=4, strengths=(0.0, 0.3), noise_kinds=("isotropic",),
            n_taus=2, n_boot=100, causal_connections=5, progress=False,
        ),
        jacobian=JacobianConfig(progress=False),
    )  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """How every step's config is made: the base (the defaults every step starts from),
    the root its run directories live under, and the two ladders' budgets."""

    base: AnalyzeConfig
    root: Path
    code_ladder: tuple[int, ...]
    sae_ladder: tuple[int, ...]

    def code_step(self, budget: int) -> AnalyzeConfig:
        """Code tokens `budget`; the first step trains the SAEs the others are given, and
        every step's codes start after the same SAE training tokens."""
        first = self.code_ladder[0]
        config = replace(self.base, tokens=budget, run_dir=str(self.root / f"code-{budget}"))
        if budget == first:
            return config
        trained = RunLayout(self.root / f"code-{first}", self.root / f"code-{first}")
        layer = self.base.layer
        return replace(
            config,
            sae_in=str(trained.sae_dir(Site("mlp_resid", layer).slug)),
            sae_out=str(trained.sae_dir(Site("mlp_out", layer).slug)),
            code_offset_tokens=self.base.sae_tokens,
        )

    def sae_step(self, budget: int) -> AnalyzeConfig:
        """SAE tokens `budget`; the codes always after the ladder's largest training budget."""
        return replace(
            self.base, sae_tokens=budget, run_dir=str(self.root / f"sae-{budget}"),
            code_offset_tokens=max(self.sae_ladder),
        )  # fmt: skip


def finished(config: AnalyzeConfig) -> RunSummary | None:
    """A step whose run finished with this config (its summary written after its
    config.json, every stage of the study in it): read back, not rerun."""
    layout = RunLayout(Path(str(config.run_dir)), Path(str(config.run_dir)))
    wanted = json.loads(json.dumps(asdict(config.resolved()), default=str))
    try:
        saved, summary = read_json(layout.config), RunSummary.read(layout.summary)
    except CoactError:
        return None
    if saved != wanted or summary is None or any(getattr(summary, s) is None for s in STAGES):
        return None
    if layout.summary.stat().st_mtime < layout.config.stat().st_mtime:
        return None  # a later run of this config started and did not finish
    return summary


def run_step(config: AnalyzeConfig, budget: int) -> Step:
    """One step: read back when finished, else run (resuming finished stages)."""
    summary = finished(config)
    reused = summary is not None
    if summary is None:
        from coact.pipeline.run import analyze

        result = analyze(config)
        assert isinstance(result, RunSummary)
        summary = result
    connect = summary.connect
    return Step(
        budget=budget, run_dir=str(config.run_dir), tokens=summary.tokens,
        sae_tokens=config.sae_tokens,
        code_offset_tokens=config.code_offset_tokens or config.sae_tokens,
        seconds=summary.timings.get("total_s", math.nan), timings=dict(summary.timings),
        reused=reused, tau=summary.calibrate.tau if summary.calibrate is not None else None,
        figures=figures_of(summary),
        heldout_tokens=connect.tokens_heldout if connect is not None else None,
        mlp_epochs_run=connect.mlp_epochs_run if connect is not None else None,
        mlp_best_epoch=connect.mlp_best_epoch if connect is not None else None,
        stage_seconds=_stage_seconds(summary),
    )  # fmt: skip


def _stage_seconds(summary: RunSummary) -> dict[str, float]:
    """Seconds connect and calibrate measured themselves (a reused stage keeps them)."""
    out: dict[str, float] = {}
    if summary.connect is not None:
        out["connect"] = sum(summary.connect.timings.values())
    if summary.calibrate is not None:
        parts = summary.calibrate.timings
        total = parts.get("total_s")
        out["calibrate"] = (
            total if total is not None else sum(v for k, v in parts.items() if k != "forward_s")
        )
    return out


def ladder_result(
    budget: str, default: int, planned: tuple[int, ...], steps: list[Step], failed: dict[str, str]
) -> Ladder:
    last, at_default = verdicts(steps, default)
    return Ladder(
        budget=budget, default=default, planned=list(planned), steps=steps, failed=failed,
        last=last, at_default=at_default,
    )  # fmt: skip


def run_ladder(
    budget: str,
    plan: Plan,
    cap: int | None,
    on_step: Callable[[Ladder], None],
) -> Ladder:
    """Every step of one ladder up to `cap`, in order; stops at the first that fails
    (a corpus too short, say), recording why."""
    planned = plan.code_ladder if budget == "tokens" else plan.sae_ladder
    make = plan.code_step if budget == "tokens" else plan.sae_step
    default = getattr(plan.base, budget)
    steps: list[Step] = []
    failed: dict[str, str] = {}
    for size in planned:
        if cap is not None and size > cap:
            break
        print(f"convergence: {budget} = {size:,}", file=sys.stderr)
        try:
            steps.append(run_step(make(size), size))
        except CoactError as error:
            failed[str(size)] = str(error)
            break
        finally:
            on_step(ladder_result(budget, default, planned, steps, failed))
    return ladder_result(budget, default, planned, steps, failed)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ladder", choices=("code", "sae", "both"), default="both")
    parser.add_argument("--max-code-tokens", type=int, default=None)
    parser.add_argument("--max-sae-tokens", type=int, default=None)
    parser.add_argument("--device", default=AnalyzeConfig.device)
    parser.add_argument("--root", type=Path, default=None, help="default: runs/convergence/")
    parser.add_argument("--quick", action="store_true", help="tiny-llama, about a minute")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {RESULTS}")
    parser.add_argument("--chart", type=Path, default=None, help=f"default: {CHART}")
    parser.add_argument("--page", type=Path, default=None, help=f"default: {PAGE}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    quick = bool(args.quick)
    root = args.root or Path("runs") / ("convergence-quick" if quick else "convergence")
    base = quick_config() if quick else AnalyzeConfig()
    base = replace(base, device=args.device, stages=STAGES)
    plan = Plan(
        base, root, QUICK_CODE_LADDER if quick else CODE_LADDER,
        QUICK_SAE_LADDER if quick else SAE_LADDER,
    )  # fmt: skip
    # the quick study writes beside its runs unless told otherwise: never over the real one
    out = args.out or (root / "convergence.json" if quick else RESULTS)
    chart = args.chart or (root / "convergence.png" if quick else CHART)
    page = args.page or (None if quick else PAGE)
    previous = read_json(out) if out.is_file() else None
    ladders: dict[str, Ladder] = {}
    if previous is not None and previous.get("quick") == quick:  # keep the other ladder's
        old = {k: Ladder.from_dict(v) for k, v in previous.get("ladders", {}).items()}
        ladders.update(old)
    budgets = {"code": ("tokens", plan.code_ladder), "sae": ("sae_tokens", plan.sae_ladder)}
    for name, (budget, planned) in budgets.items():
        if name not in ladders:  # a ladder not run yet is listed with its budgets
            ladders[name] = ladder_result(budget, getattr(base, budget), planned, [], {})

    def write(ladder: Ladder) -> None:
        ladders["code" if ladder.budget == "tokens" else "sae"] = ladder
        study = Convergence(
            model=base.model, layer=base.layer, corpus=base.corpus, quick=quick, root=str(root),
            stages=list(STAGES), rule=RULE,
            figures={n: {"label": a, "unit": u, "basis": b} for n, (a, u, b) in FIGURES.items()},
            ladders=dict(sorted(ladders.items())),
            command="python analyses/convergence.py" + (" --quick" if quick else ""),
        )  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, study.to_dict())
        _draw(out, chart, page)

    if args.ladder in ("code", "both"):
        run_ladder("tokens", plan, args.max_code_tokens, write)
    if args.ladder in ("sae", "both"):
        run_ladder("sae_tokens", plan, args.max_sae_tokens, write)
    print(f"convergence: {out}, {chart}" + (f", {page}" if page else ""), file=sys.stderr)
    return 0


def _draw(results: Path, chart: Path, page: Path | None) -> None:
    """The chart and the docs page, redrawn from the JSON after every step."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plot_convergence import draw

    draw(results, chart, page)


if __name__ == "__main__":
    sys.exit(main())
