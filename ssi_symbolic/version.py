"""The tool's version (also hashed into every generated module)."""
__version__ = "0.1.0"
