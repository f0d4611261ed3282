"""``python -m genunlearn COMMAND`` (also under ``accelerate launch -m genunlearn``)."""

import sys

from genunlearn.cli import main

sys.exit(main())
