"""influencekit: which training examples made my model do this, and what if I change them?

The one-screen view::

    import influencekit as ik
    target = ik.Target(model, ik.ClassificationTask())
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, train, kind="ggn"))
    scores = ik.Influence(target, inverse).pairwise(query, train)   # [n_query, n_train]

Sign and scale of every score: ``influencekit.conventions``.
"""

from . import (
    cli,
    conventions,
    correction,
    data,
    diagnostics,
    distributed,
    errors,
    evaluation,
    examples,
    grads,
    report,
    response,
    storage,
    testing,
)
from .curvature import Curvature
from .inverse import (
                      CG,
                      EKFAC,
                      KFAC,
                      Arnoldi,
                      BlockDiagonal,
                      Diagonal,
                      Exact,
                      Identity,
                      InverseCurvature,
                      LiSSA,
                      block_diagonal,
)
from .planner import Plan, plan
from .response import leave_one_out, minimize, response_curve, write_params
from .runtime import Runtime
from .scoring import TRAK, Influence, TracIn, stream_scores
from .task import (
    CausalLMTask,
    ClassificationTask,
    L2Regularizer,
    RegressionTask,
    SequenceClassificationTask,
    Target,
    Task,
)

__version__ = "0.1.0"

__all__ = [
    # what is computed for
    "Task", "ClassificationTask", "RegressionTask", "SequenceClassificationTask", "CausalLMTask",
    "L2Regularizer", "Target",
    # what is inverted, and how
    "Curvature", "InverseCurvature", "Exact", "CG", "LiSSA", "Arnoldi", "KFAC", "EKFAC",
    "Diagonal", "Identity", "BlockDiagonal", "block_diagonal",
    # scores
    "Influence", "TracIn", "TRAK", "stream_scores",
    # what really happens
    "response_curve", "leave_one_out", "minimize", "write_params",
    # how to run
    "Runtime", "plan", "Plan",
    # sub-packages
    "conventions", "errors", "diagnostics", "correction", "evaluation", "storage", "report",
    "grads", "response", "data", "testing", "cli", "distributed", "examples",
    "__version__",
]
