"""`python -m vkd_pyro ...` is the `vkd-pyro` command."""

import sys

from vkd_pyro.cli import main

sys.exit(main())
