"""Reference AI services, one small module each.

Each module defines ``service``; run one with ``aiso service run aiso.services.<name>:service``.
"""
