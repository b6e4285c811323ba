"""runtime.precision: the restorer's forward passes run in the chosen autocast dtype, and fp16
trains through a gradient scaler that skips a step whose gradients overflowed."""

from __future__ import annotations

import pytest
import torch

from pipeline.device import backward_and_step, grad_scaler, setup_runtime
from pipeline.models.restorer import PixelRestorer
from tests.conftest import smoke_params


@pytest.fixture(autouse=True)
def _back_to_auto():
    """The precision is per process (like the thread count): later tests get the default back."""
    yield
    setup_runtime(smoke_params().runtime)


def _model(precision):
    params = smoke_params(runtime={"precision": precision})
    device = setup_runtime(params.runtime)
    torch.set_num_threads(1)
    model = PixelRestorer.build(params.model)
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    return model, device


@pytest.mark.parametrize("precision,dtype", [("auto", torch.float32), ("fp32", torch.float32),
                                             ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_forward_passes_run_in_the_chosen_precision(precision, dtype):
    model, _ = _model(precision)
    seen = []
    model.unet.conv_in.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model.predict(x, 10, x)
    assert seen == [dtype] and out.dtype == torch.float32  # predictions leave autocast as fp32


def test_fp16_scaler_skips_an_overflowing_step_and_lowers_its_scale():
    model, device = _model("fp16")
    scaler = grad_scaler(device)
    assert scaler.is_enabled() and not grad_scaler(_model("bf16")[1]).is_enabled()
    setup_runtime(smoke_params(runtime={"precision": "fp16"}).runtime)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    before = [p.detach().clone() for p in params]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    scale = scaler.get_scale()
    backward_and_step(model.sft_loss(x, x).mean() * float("inf"), optimizer, params, 1.0, scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and scaler.get_scale() < scale
    backward_and_step(model.sft_loss(x, x).mean(), optimizer, params, 1.0, scaler)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_sft_trains_in_fp16_on_the_cpu(workspace, monkeypatch):
    from pipeline.stages import sft

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    summary = sft.run(smoke_params(runtime={"precision": "fp16"}, sft={"steps": 4}), workspace)
    assert summary["steps"] == 4 and (workspace / "checkpoints/sft/unet/config.json").exists()
