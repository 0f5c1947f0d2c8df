"""``python -m transplant_cli``: the ``transplant`` command, where the scripts folder is not on PATH."""

import sys

from . import main

sys.exit(main())
