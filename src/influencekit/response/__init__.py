"""What really happens: re-optimisation, response curves, leave-one-out."""

from .curve import ResponseCurve, leave_one_out, measure, response_curve
from .optimize import OptimizeResult, minimize, minimize_function, write_params
from .pbrf import response_changes, solve_response, solve_response_minibatch
from .retrain import (
    LBFGSRetrainer,
    Retrainer,
    SGDRetrainer,
    leave_one_out_retrained,
    subset_data,
    subset_retraining,
)
from .training import (
    OPTIMIZERS,
    TrainResult,
    batch_schedule,
    check_optimizer,
    make_optimizer,
    train,
    weighted_mean_objective,
)

__all__ = ["ResponseCurve", "response_curve", "leave_one_out", "measure", "minimize",
           "OptimizeResult", "write_params", "minimize_function"]
__all__ += ["Retrainer", "LBFGSRetrainer", "SGDRetrainer", "leave_one_out_retrained",
            "subset_retraining", "solve_response", "solve_response_minibatch",
            "response_changes"]
__all__ += ["train", "TrainResult", "batch_schedule", "check_optimizer", "make_optimizer",
            "OPTIMIZERS", "weighted_mean_objective", "subset_data"]
