"""``python -m lsmseg.challenge [OPTIONS]``: the same as ``lsmseg challenge [OPTIONS]``."""

import sys

from ..cli import main

sys.exit(main(["challenge", *sys.argv[1:]]))
