"""The package version, written once: setup.py reads it from here."""
__version__ = "0.2.0"
