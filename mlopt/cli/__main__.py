"""``python -m mlopt.cli``, as the ``mlopt`` script."""

import sys

from mlopt.cli import main

sys.exit(main())
