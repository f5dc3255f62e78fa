"""``python -m dataweights`` == ``dataweights``."""

import sys

from dataweights.cli import main

sys.exit(main())
