"""``influencekit`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="influencekit",
                                     description="Influence functions for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a demo on an embedded data set")
    demo.add_argument("which", nargs="?", default="digits", choices=["digits", "thesis"],
                      help="digits: MLP on scikit-learn digits with a picture report (default); "
                           "thesis: the three-point linear regression with exact numbers")
    demo.add_argument("--json", action="store_true", help="thesis: print one JSON object")
    demo.add_argument("--out", default="influence_report", help="digits: report folder")
    demo.add_argument("--damping", type=float, default=1e-3, help="digits: damping λ")
    demo.add_argument("--trust", action="store_true",
                      help="digits: also run the convexity and numeric-stability diagnostics")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from ..runtime import Runtime
        from .demo import digits_demo, thesis_demo

        if args.which == "thesis":
            thesis_demo(args.json)
        else:
            runtime = Runtime(progress=False if args.no_progress else None)
            digits_demo(args.out, damping=args.damping, trust=args.trust, runtime=runtime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
