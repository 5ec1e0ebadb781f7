"""Analyses of a model: `heads.py` finds its retrieval (echo / induction) heads, RazorAttention's probe."""
