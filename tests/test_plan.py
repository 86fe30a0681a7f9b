"""`coact plan`: estimates on the tiny models against hand-computed figures, and a run
that cannot fit stops before anything loads, with one line and exit status 2."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from coact.errors import CoactError
from coact.pipeline.config import AnalyzeConfig
from coact.plan.estimate import make_plan
from coact.plan.fit import Resources, problems
from coact.plan.rates import CPU, H200
from coact.plan.shape import model_shape

SMOLLM2_BLOCK = 3_540_096  # 576·(576 + 2·192 + 576) q,k,v,o + 3·576·1536 mlp + 2·576 norms
TINY_LLAMA_BLOCK = 61_568  # 64·(64 + 32 + 32 + 64) + 3·64·256 + 2·64


def _tiny(**changes: object) -> AnalyzeConfig:
    base = AnalyzeConfig(model="tiny-llama", layer=1, tokens=1000, ctx_len=32, run_dir="r")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_shapes_from_configs_alone() -> None:
    smol = model_shape("smollm2-135m")
    assert (smol.n_layers, smol.d_model, smol.vocab) == (30, 576, 49152)
    assert smol.block_params == 576 * (576 + 192 + 192 + 576) + 3 * 576 * 1536 + 2 * 576
    assert smol.params == 30 * SMOLLM2_BLOCK + 49152 * 576 + 576  # tied head, final norm
    tiny = model_shape("tiny-llama")
    assert tiny.block_params == TINY_LLAMA_BLOCK
    assert model_shape("tiny-gpt-neox").parallel and not tiny.parallel


def test_store_and_sae_bytes_by_hand() -> None:
    plan = make_plan(_tiny(), threads=2)
    # 1000 tokens in contexts of 31 stored tokens: 33 contexts, 1023 tokens; per site and
    # token 32 × (2-byte index + 4-byte value) + an 8-byte row pointer; a 16-byte token row
    assert plan.tokens == 1023
    assert plan.store_bytes == 1023 * (2 * (32 * 6 + 8) + 16)
    assert plan.sae_bytes == 2 * 4 * (2 * 64 * 256 + 2 * 256 + 64)


def test_stage_time_and_memory_by_hand() -> None:
    plan = {s.stage: s for s in make_plan(_tiny(), threads=2).stages}
    # collect: tokens × (blocks 0..1 × (block weights + ctx·d) + 2 sites × d·w), against
    # the reference: SmolLM2 block 3, 100,076 tokens of 128-token contexts, width 2304
    tiny = 1023 * (2 * (TINY_LLAMA_BLOCK + 32 * 64) + 2 * 64 * 256)
    ref = 100_076 * (4 * (SMOLLM2_BLOCK + 128 * 576) + 2 * 576 * 2304)
    assert plan["collect"].seconds == pytest.approx(15.9 * tiny / ref)
    # connect: tokens × width; memory: the H200's peak beyond SmolLM2's weights, scaled by
    # width² + tokens·k, on top of a process and the tiny model's weights
    assert plan["connect"].seconds == pytest.approx(81.4 * (1023 * 256) / (100_076 * 2304))
    working = (1_255_309_312 - 134_515_008 * 4) * (256**2 + 1023 * 32) / (2304**2 + 100_076 * 32)
    assert plan["connect"].host_bytes == pytest.approx(0.54e9 + 217_920 * 4 + working)
    assert plan["connect"].device_bytes is None


def test_the_reference_run_reproduces_its_rates() -> None:
    """Planned on the machine it was measured on, the reference run gives back each rate."""
    for machine, device in ((CPU, "cpu"), (H200, "cuda")):
        config = dataclasses.replace(
            AnalyzeConfig(), sae_tokens=machine.reference_sae_tokens, device=device
        )
        plan = {s.stage: s for s in make_plan(config, threads=2).stages}
        for stage, rate in machine.rates.items():
            assert plan[stage].seconds == pytest.approx(rate.seconds), (machine.name, stage)


def test_more_threads_and_a_gpu_change_the_plan() -> None:
    two, four = make_plan(_tiny(), threads=2), make_plan(_tiny(), threads=4)
    assert four.seconds == pytest.approx(two.seconds / 2)
    gpu = make_plan(_tiny(device="cuda"))
    assert gpu.device_bytes is not None and gpu.device_bytes > 217_920 * 4


def test_what_does_not_fit_is_named() -> None:
    plan = make_plan(_tiny(tokens=10**12), threads=2)
    roomy = Resources(ram=1e30, disk=1e30, gpu=None)
    assert problems(plan, roomy) == []
    found = problems(plan, Resources(ram=1e30, disk=1e9, gpu=None))
    assert len(found) == 1 and "lower --tokens" in found[0] and "GB is free" in found[0]
    tight = problems(make_plan(_tiny(), threads=2), Resources(ram=1e6, disk=1e15, gpu=None))
    assert len(tight) == 1 and "of memory at" in tight[0]


def test_unknown_hub_model_is_one_clear_error() -> None:
    with pytest.raises(CoactError, match="local Hugging Face cache"):
        model_shape("nobody-here/no-such-model-xyz")


def _main(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    from coact import cli

    monkeypatch.setattr(sys, "argv", ["coact", *argv])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    return int(stopped.value.code or 0)


def test_impossible_budget_stops_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import coact.models.load as load

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(load, "load_model", refuse)
    run = tmp_path / "run"
    args = ["--model", "tiny-llama", "--tokens", str(10**14), "--run-dir", str(run)]
    assert _main(["analyze", *args], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coact: error: the run needs")
    assert "lower --tokens" in err[0] and not run.exists()
    assert _main(["plan", *args], monkeypatch) == 2
    out = capsys.readouterr()
    assert "fits: NO" in out.out and out.err.count("\n") == 1


def test_plan_command_prints_the_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["plan", "--model", "tiny-gpt2", "--layer", "1", "--run-dir", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as stopped:
        from coact import cli

        monkeypatch.setattr(sys, "argv", ["coact", *args])
        cli.main()
        raise SystemExit(0)
    assert stopped.value.code in (0, None)
    out = capsys.readouterr().out
    for stage in ("train_saes", "collect", "connect", "calibrate", "report"):
        assert f"\n{stage} " in out
    assert "fits: yes" in out and not (tmp_path / "r").exists()
