import sys

from opd_jax.commands import main

sys.exit(main())
