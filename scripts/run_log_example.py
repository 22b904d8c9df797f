"""Print the Slicer module's run log for the self-test's phantom pair, made outside Slicer (docs/user_guide.md).

The same library calls, in the same order, as the module's logic: Register (RunLog.begin, the Workspace's progress
and `say`, registration_lines, the verdict, end), then a pair placed, dragged and the drag undone.

    PYTHONPATH=ImplicitKernelRegistration .venv/bin/python scripts/run_log_example.py
"""

from __future__ import annotations

import time

import numpy as np

from ImplicitKernelRegistrationLib import slicer_bridge
from ImplicitKernelRegistrationLib.synthetic.phantom import make_phantom
from ImplicitKernelRegistrationLib.synthetic.synth import make_case
from ImplicitKernelRegistrationLib.workspace import Workspace


def main() -> None:
    """Register the phantom pair on the CPU at 3 mm, edit one pair, print every run-log line and the quality line."""
    ct = make_phantom(seed=1, size=(96, 80, 64), spacing_mm=(3.0, 3.0, 3.0))[0]
    case = make_case(ct, "breathing", 1)
    log = slicer_bridge.RunLog()
    log.listeners.append(print)
    log.begin("Register 'moving' to 'fixed' (cpu, 3 mm grid)")
    workspace = Workspace(None, command="ImplicitKernelRegistration", say=log.say)
    inputs = {"fixed": "fixed", "moving": "moving"}
    config = {"spacing_mm": 3.0, "device": "cpu"}
    workspace.register(case.fixed, case.moving, config, progress=log.progress, inputs=inputs)
    for line in slicer_bridge.registration_lines(workspace.report):
        log.say(line)
    log.verdict(workspace.quality)
    log.end("done")
    fixed, moving = case.landmarks_fixed_lps[:1], case.landmarks_moving_lps[:1] + np.array([[2.0, 0.0, 0.0]])
    start = time.perf_counter()
    ids = workspace.edit_pairs(add=(fixed, moving))
    log.say(slicer_bridge.pair_edit_line({"added": ids}, time.perf_counter() - start, workspace.feedback()))
    start = time.perf_counter()
    workspace.edit_pairs(move={ids[0]: (fixed[0] + [0.0, 0.0, 3.0], moving[0] + [0.0, 0.0, 3.0])})
    log.say(slicer_bridge.pair_edit_line({"moved": ids}, time.perf_counter() - start, workspace.feedback()))
    start = time.perf_counter()
    workspace.undo()
    seconds = time.perf_counter() - start
    log.say(slicer_bridge.pair_edit_line({"moved back": ids}, seconds, workspace.feedback(), action="undo"))
    print(slicer_bridge.quality_summary(workspace.quality))


if __name__ == "__main__":
    main()
