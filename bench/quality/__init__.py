"""Quality evaluation of kvpass configurations and the kvpress peer on a real model (issue 4).

Entry point: ``python bench/quality/eval_quality.py``. Modules, in the order the data flows: ``corpus``
(license-clean text), ``tasks`` (prompts), ``configs`` (what runs), ``decode`` (generation and
teacher forcing through the cache), ``perplexity``, ``runner`` (runs the selected configurations,
incl. the peer in ``kvpress_peer``), ``store`` (merges a run into the results file), ``report``
(markdown, plots).
"""
