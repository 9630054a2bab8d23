"""`make bench-ai`: provider-bound generation jobs (bench/ai/__main__.py)."""
