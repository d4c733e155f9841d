"""Runnable examples: the seed papers' methods on scikit-learn's digits (no downloads)."""
