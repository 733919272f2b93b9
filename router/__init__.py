"""router: built in a later issue (see ../shared/DESIGN.md)."""
