"""Numbers from JSON checked against the type the model computes in: float32.

A JSON number may be valid float64 and still overflow float32 (1e300 becomes inf deep
in a library), or be an integer of hundreds of digits (OverflowError in `float()`), and
JSON's `true` is a Python int. Each is caught here, where the value arrives.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)


def float32_problem(value: Any) -> str | None:
    """Why `value` is not a finite float32 number, or None when it is one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected a number, got {_json_type(value)}"
    # Python compares ints with floats exactly, whatever the int's size: no overflow.
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN or infinite values are not allowed"
    if not -FLOAT32_MAX <= value <= FLOAT32_MAX:
        shown = (
            f"{value:.3g}"
            if isinstance(value, float)
            else f"an integer of {len(str(abs(value)))} digits"
        )
        return f"{shown} is outside float32's range (±{FLOAT32_MAX:.4g})"
    return None


def nested_float32_problem(values: Any, where: str) -> str | None:
    """The first problem in nested lists of numbers, named by its index path."""
    if isinstance(values, list):
        for i, value in enumerate(values):
            problem = nested_float32_problem(value, f"{where}[{i}]")
            if problem:
                return problem
        return None
    problem = float32_problem(values)
    return f"{where}: {problem}" if problem else None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"a string ({value[:20]!r})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
