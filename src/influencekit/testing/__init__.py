"""Reference problems with closed-form answers.

Also (import them explicitly): :mod:`influencekit.testing.faults`, a fault-injection harness
(SIGKILL at random points, concurrent writers, a ledger of rows lost), and
:mod:`influencekit.testing.workers`, the resumable workers it runs.
"""

from .reference import (
                        THESIS_LOSS_INFLUENCE,
                        THESIS_PARAM_INFLUENCE,
                        THESIS_THETA,
                        ThesisAnswer,
                        solve_thesis,
                        thesis_data,
                        thesis_target,
)

__all__ = ["solve_thesis", "thesis_data", "thesis_target", "ThesisAnswer", "THESIS_THETA",
           "THESIS_PARAM_INFLUENCE", "THESIS_LOSS_INFLUENCE"]
