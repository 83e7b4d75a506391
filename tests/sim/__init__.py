"""Deterministic simulation of the whole protocol (docs/verification.md, "Deterministic
simulation"): the real client core against simulated instances running the reference
model, over a simulated network and clock, faults and invariants driven by a seed."""

import os
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:  # (the reference model is tests/model.py)
    sys.path.insert(0, _TESTS)
