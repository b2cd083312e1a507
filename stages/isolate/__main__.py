"""``python -m stages.isolate FD PARENT ROOTFS`` starts a holder (see :mod:`stages.isolate.holder`)."""

import sys

from stages.isolate.holder import main

sys.exit(main(sys.argv[1:]))
