"""Data sets: each data/<name>/prepare.py writes train.bin, val.bin and meta.json; data.common is shared."""
