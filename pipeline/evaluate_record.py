"""The evaluate stage's record, written as two files: metrics/evaluate.json (the headline DVC
lists as metrics) and metrics/evaluate_detail.json (everything). `merge` gives the whole record
back to what reads both (the stage's table, `restorl ablate`), without importing the stage."""

from __future__ import annotations


def merge(headline: dict, detail: dict) -> dict:
    """The whole evaluate record from its two files (the detail holds everything the headline
    does but `rl_vs_sft`, which it has in full as `vs_sft`)."""
    return {k: v for k, v in headline.items() if k != "rl_vs_sft"} | detail
