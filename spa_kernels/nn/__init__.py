"""Drop-in SPA modules (being written)."""
