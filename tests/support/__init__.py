"""Helpers shared by the test folders: case harnesses, oracles, models."""
