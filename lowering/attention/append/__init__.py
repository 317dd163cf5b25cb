"""Quantize-on-append: ``kernel.py`` (device code), ``launcher.py`` (validates and launches)."""
