"""``python -m tpu_setup``: see :mod:`tpu_setup.cli`."""

from tpu_setup.cli import main

raise SystemExit(main())
