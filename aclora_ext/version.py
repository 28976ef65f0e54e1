"""The package version, written into every file's metadata (``aclora_version``)."""

__version__ = "0.2.0"
