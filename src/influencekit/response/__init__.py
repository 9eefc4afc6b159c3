"""What really happens: re-optimisation, response curves, leave-one-out."""

from .curve import ResponseCurve, leave_one_out, measure, response_curve
from .optimize import OptimizeResult, minimize, write_params
from .pbrf import response_changes, solve_response, solve_response_minibatch
from .retrain import (
    LBFGSRetrainer,
    Retrainer,
    SGDRetrainer,
    leave_one_out_retrained,
    subset_retraining,
)

__all__ = ["ResponseCurve", "response_curve", "leave_one_out", "measure", "minimize",
           "OptimizeResult", "write_params"]
__all__ += ["Retrainer", "LBFGSRetrainer", "SGDRetrainer", "leave_one_out_retrained",
            "subset_retraining", "solve_response", "solve_response_minibatch",
            "response_changes"]
