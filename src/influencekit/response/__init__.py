"""What really happens: re-optimisation, response curves, leave-one-out."""

from .curve import ResponseCurve, leave_one_out, measure, response_curve
from .optimize import OptimizeResult, minimize, write_params

__all__ = ["ResponseCurve", "response_curve", "leave_one_out", "measure", "minimize",
           "OptimizeResult", "write_params"]
