"""Compression: structured and unstructured pruning (``prune``), quantization (``quantize``).

Each module is imported where it is used; this package imports none of them, so they stay
independent of one another.
"""
