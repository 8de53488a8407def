"""Data: sources (files, hub ids, the built-in catalog), formats, validation, cleaning, packing."""
