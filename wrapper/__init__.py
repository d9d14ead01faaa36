"""aiso gateway: the REST API through which clients submit tasks and follow them.

``create_app`` builds the FastAPI application; ``aiso wrapper`` serves it with uvicorn.
"""

from .app import create_app

__all__ = ["create_app"]
