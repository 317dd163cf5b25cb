"""Decode attention that stops reading KV blocks once a proven bound allows: ``bound.py`` (summaries,
visiting plan, torch reference), ``kernel.py``, ``launcher.py``."""
