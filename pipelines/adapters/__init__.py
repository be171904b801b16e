"""Adapters applied on a warm pipeline per request: LoRA and textual-inversion embeddings.
"""
