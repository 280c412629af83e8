"""A user's research package, as `--model` / `loss_type` see it (importable from tests/methods)."""
