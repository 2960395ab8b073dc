"""`python -m tests.fault_launcher ARGS`: `vfsnap ARGS` with the fault plan of `VFSNAP_FAULTS`
installed first (tests/faults.py), so that the package itself carries no fault injection.

The count of operations is reported at exit (VFSNAP_FAULTS_REPORT), after vfsnap unmounted.
"""

from __future__ import annotations

import sys

from tests import faults
from vfsnap.cli.main import main


def launch(argv: list[str]) -> int:
    faults.install_from_environment()
    try:
        return main(argv)
    finally:
        faults.report()


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
