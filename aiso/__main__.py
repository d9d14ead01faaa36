"""``python -m aiso`` is the ``aiso`` command."""

from aiso.cli import main

main()
