"""The library version, in a leaf module so that writers record it without importing the package root."""

__version__ = "0.1.0"
