"""The version of lorakit."""

__version__ = "0.1.0"
