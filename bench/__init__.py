"""Benchmarks of ai-jobs against its Python peers on one PostgreSQL (docs/benchmarks.md)."""
