"""influencekit: which training examples made my model do this, and what if I change them?

The one-screen view::

    import influencekit as ik
    target = ik.Target(model, ik.ClassificationTask())
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, train, kind="ggn"))
    scores = ik.Influence(target, inverse).pairwise(query, train)   # [n_query, n_train]

Sign and scale of every score: ``influencekit.conventions``.
"""

from . import conventions, errors
from .curvature import Curvature
from .inverse import Exact, InverseCurvature
from .inverse import CG, Arnoldi, BlockDiagonal, Diagonal, Identity, LiSSA, block_diagonal
from .inverse import EKFAC, KFAC
from .response import leave_one_out, minimize, response_curve, write_params
from .runtime import Runtime
from .scoring import Influence
from .scoring import TRAK, TracIn
from . import evaluation
from .task import ClassificationTask, L2Regularizer, RegressionTask, Target, Task

__version__ = "0.1.0"

__all__ = [
    "Task", "ClassificationTask", "RegressionTask", "L2Regularizer", "Target",
    "Curvature", "InverseCurvature", "Exact", "Influence", "Runtime",
    "response_curve", "leave_one_out", "minimize", "write_params",
    "conventions", "errors", "__version__",
]
__all__ += ["CG", "LiSSA", "Arnoldi", "Diagonal", "Identity", "BlockDiagonal", "block_diagonal"]
__all__ += ["KFAC", "EKFAC"]
__all__ += ["TracIn", "TRAK", "evaluation"]
