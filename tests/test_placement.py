"""Device placement: models load straight onto an accelerator (device_map) when accelerate is there, and
the CPU path is unchanged."""

from __future__ import annotations

import pytest
import torch

import hpc_es.models as models
from hpc_es.comm import Comm
from hpc_es.config import load_config
from hpc_es.placement import device_scope, local_devices


class _Fake(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize("device, accelerate, want", [
    ("cpu", True, {}),
    ("cpu", False, {}),
    ("meta", True, {"device_map": {"": "meta"}}),  # any non-CPU device: straight onto it
    ("meta", False, {}),  # no accelerate: host memory first (with a warning), then .to(device)
])
def test_load_model_passes_a_device_map_only_off_the_cpu(device: str, accelerate: bool, want: dict,
                                                         tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    import transformers

    seen: dict = {}

    def fake(path: str, **kw: object) -> _Fake:
        seen.update(kw)
        return _Fake()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(models, "_has_accelerate", lambda: accelerate)
    monkeypatch.setattr(models, "_WARNED", set())
    with caplog.at_level("WARNING", logger="hpc_es"):
        model = models.load_model(tiny_model_dir, torch.bfloat16, device)
    assert {k: v for k, v in seen.items() if k == "device_map"} == want
    assert seen["dtype"] == torch.bfloat16 and seen["local_files_only"] is True
    assert model.w.device.type == device
    assert ("accelerate is not installed" in caplog.text) == (device != "cpu" and not accelerate)


def test_cpu_placement_needs_no_cuda_and_device_scope_is_a_no_op() -> None:
    cfg = load_config(None, ["device=cpu", "dist.replicas_per_device=3"])
    assert local_devices(cfg, Comm()) == [torch.device("cpu")] * 3
    with device_scope(torch.device("cpu")):
        assert torch.ones(1).device.type == "cpu"
