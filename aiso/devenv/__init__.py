"""Helpers behind ``aiso dev``: bringing up a local broker and presenting the children's output.

Kept out of ``aiso.cli`` so the command module reads as the sequence of steps it runs, and so
the admin commands can reuse the broker helpers.
"""

__all__: list[str] = []
