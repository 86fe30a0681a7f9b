"""What the command line calls: the plan's text, and the check that stops a run that
cannot fit before its model loads."""

from __future__ import annotations

from coact.errors import CoactError
from coact.pipeline.config import AnalyzeConfig
from coact.plan.estimate import make_plan
from coact.plan.fit import free_resources, problems
from coact.plan.format import format_plan


def plan_text(config: AnalyzeConfig) -> str:
    """The plan of `config` on this machine; a CoactError (exit 2) when it does not fit,
    after the plan is printed."""
    plan = make_plan(config)
    free = free_resources(plan.run_dir, plan.device)
    text = format_plan(plan, free)
    if found := problems(plan, free):
        print(text)
        raise CoactError(found[0])
    return text


def stop_unless_fits(config: AnalyzeConfig) -> None:
    """Raise the plan's one-line CoactError when the run cannot fit. A config the plan
    cannot read (an unknown model, a context too short) is left to the run's own checks,
    whose messages name the problem."""
    if config.ctx_len < 2 or config.tokens < 1:
        return
    try:
        plan = make_plan(config)
    except CoactError:
        return
    if found := problems(plan, free_resources(plan.run_dir, plan.device)):
        raise CoactError(found[0])
