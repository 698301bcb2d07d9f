"""`python -m conj_lite.cli` (as `accelerate launch -m conj_lite.cli` needs)."""

import sys

from . import main

sys.exit(main())
