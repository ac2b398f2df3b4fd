"""The routing engine's one-screen summary (same as ``fastroute bench``).

    python benches/router_summary.py [--full] [--budget SECONDS]

The scenarios and the measurement live in ``fastroute/benchsummary.py`` so
that an installed package can run them too.
"""

import sys
from pathlib import Path

try:
    from fastroute.benchsummary import main
except ImportError:  # a source checkout that was built in place, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fastroute.benchsummary import main

if __name__ == "__main__":
    sys.exit(main())
