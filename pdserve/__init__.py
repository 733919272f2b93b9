"""pdserve: the light base (config, protocol, tokenizer, hashing) and the doors.

Nothing here imports torch or ray at import time.
"""

__version__ = "0.1.0"
