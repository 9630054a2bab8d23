"""Mutation testing of what mutmut cannot mutate: planted edits of the SQL
(`python -m tests.mutants.planted`, run by `make mutants`; docs/testing.md)."""
