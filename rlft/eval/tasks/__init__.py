"""Offline lm-eval task definitions (YAML + local JSONL data) shipped with rlft; see rlft.eval.harness."""
