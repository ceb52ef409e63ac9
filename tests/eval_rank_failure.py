"""Run under ``torchrun`` by test_eval_parallel.py: ``python -m gsam_monitor.eval`` in which one
rank fails.

Usage::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/eval_rank_failure.py \\
        STAGE FAILING_MODEL -- EVAL ARGUMENTS...

STAGE is ``load`` (the failing rank cannot load ``FAILING_MODEL``: an ``OSError``, as for a
missing folder) or ``pass`` (it raises a ``RuntimeError`` in the second pass of
``FAILING_MODEL``, after the ranks have summed the first pass). The last rank fails; the others
run normally. The process exits with ``main``'s status.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import gsam_monitor.eval.__main__ as cli
import gsam_monitor.eval.protocols as protocols

FAILING_RANK = int(os.environ["WORLD_SIZE"]) - 1


def main() -> int:
    stage, failing_model, sep, *argv = sys.argv[1:]
    assert sep == "--", sys.argv
    fails = int(os.environ["RANK"]) == FAILING_RANK
    if fails and stage == "load":
        real_load = cli.load_model

        def load_model(spec, **kwargs):
            if spec == failing_model:
                raise OSError(f"--model: could not load {spec!r} on this rank (injected)")
            return real_load(spec, **kwargs)

        cli.load_model = load_model
    elif fails and stage == "pass":
        real_pass = protocols._second_pass
        current = {"model": None}
        real_forward = protocols._forward

        def forward(loaded, *args, **kwargs):
            current["model"] = loaded.name
            return real_forward(loaded, *args, **kwargs)

        def second_pass(*args, **kwargs):
            if current["model"] == failing_model:
                raise RuntimeError("second pass failed on this rank (injected)")
            return real_pass(*args, **kwargs)

        protocols._forward = forward
        protocols._second_pass = second_pass
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
