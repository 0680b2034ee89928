"""`python -m runners.corpus INPUT OUT_DIR ...`: runners.corpus.command."""

import sys

from runners.corpus.command import main

sys.exit(main())
