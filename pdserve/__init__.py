"""pdserve: the light base (config, protocol, tokenizer, hashing) and the doors. No torch, no ray here."""

__version__ = "0.1.0"
