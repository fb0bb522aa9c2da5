"""hfx-attention: see the hfx README. Import-light: contributions are declared in `_plugin.py` as strings."""

__version__ = "0.1.0"
