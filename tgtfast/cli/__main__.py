"""``python -m tgtfast.cli ...`` runs the ``tgtfast`` command line."""

import sys

from tgtfast.cli import main

sys.exit(main())
