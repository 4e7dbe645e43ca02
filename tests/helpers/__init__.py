"""Shared test helpers: scripted language models, test-double environments, data fixtures and skip conditions.

Importable as `helpers.<module>` (pytest puts `tests/` on the import path, and env worker processes inherit it).
"""
