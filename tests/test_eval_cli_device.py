"""``--device`` names a device this machine has, or the CLI stops with a usage error (exit code 2)
that lists the devices that exist, before any corpus or model is loaded; no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gsam_monitor.eval.__main__ import main
from gsam_monitor.eval.models import available_devices, load_model, resolve_device

ROOT = Path(__file__).resolve().parent.parent


def _absent_cuda() -> str:
    """A CUDA device this machine does not have."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def test_absent_cuda_device_is_a_usage_error_from_the_command_line() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "gsam_monitor.eval", "--device", _absent_cuda(), "--quiet"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert "usage: python -m gsam_monitor.eval" in run.stderr
    assert f"error: --device: device '{_absent_cuda()}' is not available here" in run.stderr
    assert f"devices on this machine: {', '.join(available_devices())}" in run.stderr


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        ("mps", "is not available here: no mps device is available"),
        ("tpu9", "is not a torch device name"),
        ("", "is not a torch device name"),
    ],
)
def test_other_absent_or_unknown_devices_are_usage_errors(device: str, reason: str, capsys) -> None:
    if device in available_devices():
        pytest.skip(f"{device} is present on this machine")
    with pytest.raises(SystemExit) as exc:
        main(["--device", device, "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--device: device '{device}' {reason}; devices on this machine: cpu" in err


def test_library_calls_raise_value_errors_naming_the_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"device '.*' is not available here: .*devices on this machine: cpu"):
        load_model("tiny:gpt2", device=_absent_cuda())
