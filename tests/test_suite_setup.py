"""The suite itself: plain ``pytest`` from the repository root works (not only
``python -m pytest``), and no environment a user brings can make it reach the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THIS = "tests/test_suite_setup.py::test_network_switches_are_forced_offline"


def test_network_switches_are_forced_offline() -> None:
    # Also run in a hostile environment by the test below, through plain `pytest`.
    import gsam_monitor
    import tests.reference  # importable: the repository root is on sys.path

    assert Path(tests.reference.__file__).resolve().parent == REPO / "tests"
    assert Path(gsam_monitor.__file__).resolve().parent == REPO / "gsam_monitor"  # this checkout's
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert os.environ.get(var) == "1", var
    # wandb.init(mode="offline") in earlier tests rewrites it as "dryrun", its old name.
    assert os.environ.get("WANDB_MODE") in ("offline", "dryrun")
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_plain_pytest_from_the_root_is_offline_whatever_the_environment(tmp_path: Path) -> None:
    """The console script, not ``python -m pytest`` (which puts the working directory on
    sys.path), from the root, with no PYTHONPATH and a user's online settings."""
    script = Path(sys.executable).with_name("pytest")
    # `python -I` puts neither the working directory nor PYTHONPATH on sys.path: the same
    # start as the console script, where there is none.
    command = [str(script)] if script.exists() else [sys.executable, "-I", "-c", "import pytest; exit(pytest.main())"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
                "WANDB_MODE": "online", "PYTEST_ADDOPTS": ""})
    proc = subprocess.run(
        [*command, THIS, "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
