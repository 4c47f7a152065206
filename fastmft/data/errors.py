"""The data layer's error, in a module of its own so that the configs (torch-free, for
``fastmft CMD --help``) can raise its subclasses without importing datasets."""


class DataError(ValueError):
    """Input that cannot be used: an unreadable file, a missing column, a bad row."""
