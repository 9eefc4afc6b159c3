"""Reference problems with closed-form answers."""

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
