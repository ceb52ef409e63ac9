"""scripts/gpu_check.sh and benchmarks/gpu_step.py run rarely (on a lent GPU): their CPU-side
logic is checked here so that a GPU run is not spent on a broken script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def test_gpu_step_benchmark_runs_its_checks_on_a_tiny_model(tmp_path: Path, monkeypatch, capsys) -> None:
    """The tiny model of the same shape on CPU: 13 layers (12 of d = 32, one of d = 128) all
    logged without a monitor error, the sync check's collection steps really collected, and
    one verdict line per check (timings are not judged here: not a benchmark run)."""
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.delenv("OUT", raising=False)
    import gpu_step

    out = tmp_path / "gpu_step.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add synchronisation
    try:
        gpu_step.main(["--device", "cpu", "--tiny", "--steps", "3", "--reps", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    checks = results["checks"]
    assert list(checks) == ["all_layers_logged", "overhead", "peak_memory", "no_host_sync", "log_time"]
    assert checks["all_layers_logged"]["verdict"] == "PASS", checks["all_layers_logged"]
    assert "13 layers (d = 32 x 12, 128 x 1), 0 errors" in checks["all_layers_logged"]["detail"]
    assert checks["no_host_sync"]["verdict"] == "SKIP" and "13 layers, 0 errors" in checks["no_host_sync"]["detail"]
    assert checks["peak_memory"]["verdict"] == "SKIP"
    assert checks["log_time"]["background_ms"] > 0 and checks["log_time"]["inline_ms"] > 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.split(" ")[0] in ("PASS", "FAIL", "SKIP")]
    assert [line.split(" ")[1].rstrip(":") for line in lines] == list(checks)
    sys.modules.pop("gpu_step", None)


def test_gpu_memory_benchmark_runs_its_checks_on_a_tiny_model(tmp_path: Path, monkeypatch) -> None:
    """The memory checks' logic on a tiny Llama on CPU: one log without a monitor error, the
    flush timed, the CUDA-only checks skipped with their reason."""
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_memory

    out = tmp_path / "gpu_memory.json"
    results = gpu_memory.main(["--device", "cpu", "--tiny", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    checks = results["checks"]
    assert checks["memory_plan"]["status"] == "SKIP" and checks["no_sync"]["status"] == "SKIP"
    assert checks["flush"]["status"] == "PASS" and checks["flush"]["ms_per_layer"] > 0
    assert results["plan_device_bytes"] == 2 * (8 * (64 * 64 + 6 * 64) + 16) + 2 * (2**22 // 64) * 64 * 8
