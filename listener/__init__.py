"""ai-jobs: an event-driven job queue for AI generation work on PostgreSQL LISTEN/NOTIFY."""

__version__ = "0.1.0"
