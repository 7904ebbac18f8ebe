"""`taskprune report RUN_DIR`: the paper-style report of a pruning study.

:func:`write_report` reads a study directory (``results.sqlite``, ``layers.json``, optionally
``config.yaml``) and writes ``report.md`` (GitHub tables, PNG figures beside it) and one
self-contained ``report.html`` (inline CSS, figures embedded as base64 PNG).

* :mod:`.tables` — pure functions: strategy x ratio grids, eq. 3/4/5, paired bootstrap, resources;
* :mod:`.plots` — matplotlib (Agg canvas) figures as PNG bytes;
* :mod:`.render` — the Markdown and HTML documents.
"""

from .render import write_report

__all__ = ["write_report"]
