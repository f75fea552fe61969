"""The library's version (a module of its own, so that any layer can record it without importing the package)."""

__version__ = "0.2.0"
