"""``stages doctor``: can this machine run the workshop?

::

    stages doctor [--json]

One line per check, ✓ passed, ✗ failed (with the line to type under it), ! a note. Exits 0 iff every
required check passed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from stages import doctor


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the checks as JSON instead of text")


def run(args: argparse.Namespace) -> int:
    results = doctor.checks()
    if args.json:
        print(json.dumps([asdict(check) for check in results], indent=2))
    else:
        print("stages doctor: can this machine run the workshop?\n")
        print(doctor.report(results))
    return 0 if doctor.passed(results) else 1
