"""pdserve: the light base (config, protocol, tokenizer, hashing) and the doors.

Nothing here imports torch or ray at import time. ``from pdserve import Client, AsyncClient``
loads the HTTP client SDK on first use.
"""

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client"]


def __getattr__(name: str):
    if name in __all__:
        from pdserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
