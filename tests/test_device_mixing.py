"""Every stage honours `--device`: a tiny run (all stages but the report, with its control)
on a 'cuda' emulated on the CPU (`tests.fake_cuda`), where an op mixing a cuda tensor with a
CPU one raises as it would on a GPU. First, the emulator itself catches what CUDA rejects
and allows what CUDA allows."""

from __future__ import annotations

import json

import pytest
import torch

from coact.pipeline.config import STAGE_NAMES
from coact.pipeline.run import analyze
from tests.fake_cuda import DeviceMix, fake_cuda, marked
from tests.tiny_run import tiny_config


def test_the_emulator_rejects_what_cuda_rejects() -> None:
    with fake_cuda():
        a = torch.ones(3, device="cuda")
        assert a.device == torch.device("cuda", 0) and marked(a * 2)
        with pytest.raises(DeviceMix, match="add"):
            a + torch.ones(3)
        with pytest.raises(DeviceMix):
            torch.zeros(3)[torch.tensor([0], device="cuda")]
        with pytest.raises(TypeError, match="numpy"):
            a.numpy()
        layer = torch.nn.Linear(3, 2).to("cuda")
        with pytest.raises(DeviceMix, match="linear"):
            layer(torch.ones(1, 3))


def test_the_emulator_allows_what_cuda_allows() -> None:
    module_to, available = torch.nn.Module.to, torch.cuda.is_available
    with fake_cuda():
        a = torch.ones(4, device="cuda")
        b = a + torch.tensor(2.0)  # a CPU scalar
        picked = a[torch.tensor([0, 2])]  # CPU indices into a cuda tensor
        back = b.cpu()
        assert marked(picked) and not marked(back)
        assert back.numpy().tolist() == [3.0] * 4
        layer = torch.nn.Linear(4, 2).to("cuda")
        with torch.no_grad():
            on_cuda = layer(a[None])
            layer.cpu()
            assert marked(on_cuda) and not marked(layer.weight)
            torch.testing.assert_close(on_cuda.cpu(), layer(torch.ones(1, 4)))
    assert torch.nn.Module.to is module_to and torch.cuda.is_available is available  # undone


def test_every_stage_runs_on_the_device_it_is_given(tmp_path) -> None:
    stages = tuple(s for s in STAGE_NAMES if s != "report")
    config = tiny_config(tmp_path, device="cuda", control=True, stages=stages)
    with fake_cuda():
        summary = analyze(config)
    assert summary.jacobian is not None and summary.calibrate is not None
    assert summary.block is not None and summary.ablation is not None
    assert summary.control is not None
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["jacobian"]["features_scored"] == summary.jacobian.features_scored
