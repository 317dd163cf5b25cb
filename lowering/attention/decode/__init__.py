"""Split-KV decode attention over full-precision and packed caches: ``kernel.py`` with its tile loaders
(``packed_tiles.py``, ``int4_tiles.py``, ``int4_keys.py``), ``launcher.py`` (validation, tiles, splits)."""
