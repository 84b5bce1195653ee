"""Shared pytest setup: puts tests/ on sys.path so `support.*` helpers import."""
