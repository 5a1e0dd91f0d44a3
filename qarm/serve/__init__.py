"""Serving (the paper's section 3): bundles of trained models, a scorer, live stores and the HTTP service.

* ``bundle.py``: :func:`export_bundle` / :func:`load_bundle`, versioned hash-checked folders, one pointer;
* ``scorer.py``: :class:`Scorer`, a bundle's model scoring requests through the training batch path, and
  new items' codes from the frozen codebooks;
* ``store.py``: live state shared by server processes (items added, the event log): SQLite or Redis;
* ``app.py``: the FastAPI service (``qarm serve``), hot reload, Prometheus metrics.
"""
