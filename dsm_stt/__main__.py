"""``python -m dsm_stt``: the ``dsm-stt`` command."""

import sys

from .cli import main

sys.exit(main())
