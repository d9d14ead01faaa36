"""Helpers behind the developer commands ``aiso dev`` and ``aiso submit``.

Kept out of ``aiso.cli`` so each command module reads as the steps it runs: bringing up a
local broker and store, presenting the children's output, following a task's progress.
"""

__all__: list[str] = []
