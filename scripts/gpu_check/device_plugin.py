"""A pytest plugin (`-p device_plugin`, scripts/gpu_check on PYTHONPATH) that runs tests/rollout/test_engine_contract.py
with its models on GPU_CHECK_DEVICE (e.g. "cuda"), unchanged otherwise: the test module's `build_model` is
wrapped so that the model it returns sits on that device, and with it the Learner and the local engine that the
test builds from it. With GPU_CHECK_DEVICE unset or "cpu" it does nothing."""

from __future__ import annotations

import os

import pytest

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cpu")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if DEVICE == "cpu":
        return
    for module in {getattr(item, "module", None) for item in items}:
        build = getattr(module, "build_model", None)
        if build is None or getattr(build, "on_device", False):
            continue

        def on_device(*args, _build=build, **kwargs):
            model, tokenizer = _build(*args, **kwargs)
            return model.to(DEVICE), tokenizer

        on_device.on_device = True
        module.build_model = on_device
