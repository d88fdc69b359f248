"""``python -m shoal.cli``: the same as the ``shoal`` command."""

from shoal.cli.main import main

main()
