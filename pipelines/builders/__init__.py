"""Builders of random-weight checkpoints: the tiny demo models (written by `sdfunc serve` and the
tests) and real-architecture files in the public single-file layout. Not used to serve a request.
"""
