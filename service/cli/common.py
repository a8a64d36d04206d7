"""Arguments shared by several sub-commands."""

from __future__ import annotations

import argparse


def spec_args(p: argparse.ArgumentParser) -> None:
    """The SPEC argument and repeatable --set overrides (shared by run/validate/submit/...)."""
    p.add_argument("spec", help="job YAML")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a field, e.g. --set optim.max_steps=200 (repeatable)",
    )
