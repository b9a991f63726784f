"""``python -m nearstep ...``: the same as the ``nearstep`` command (``nearstep.cli``).

Useful where the console script is not on ``PATH`` (a virtual environment that is
not activated) or to pick the interpreter explicitly (``python3.12 -m nearstep``).
"""

from __future__ import annotations

import sys

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    # The console script does sys.exit(main()) too: main() returns the exit status.
    sys.exit(main())
