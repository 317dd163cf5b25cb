"""Fused scoring of budgeted decode steps and attention over the kept tokens: ``kernel.py``, ``launcher.py``."""
