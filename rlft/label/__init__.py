"""Human preference collection: labeling UI + HTTP API + database (``rlft label``).

Modules: :mod:`~rlft.label.db` (schema, engines, migrations), :mod:`~rlft.label.importing` (JSONL readers),
:mod:`~rlft.label.store` (assignment with leases, votes), :mod:`~rlft.label.agreement` and
:mod:`~rlft.label.quality` (agreement statistics), :mod:`~rlft.label.export` (DPO pairs, win-rates),
:mod:`~rlft.label.api` (FastAPI), :mod:`~rlft.label.ui` (Gradio), :mod:`~rlft.cli.label`.
Nothing here imports torch; gradio is imported only when the UI is served.
"""
