"""The chaos soak (`make soak`): workers on several simulated hosts (network
namespaces joined by a bridge), a PostgreSQL primary and synchronous standby of
its own, the fake providers as their own process, a steady mix of course and
media jobs from many users, and faults from a seeded driver; afterwards a
checker proves from the database, the storage, the fake's request log and the
workers' logs that nothing was lost or run twice at once, and writes a one-page
report. docs/reliability.md has the figures and how to run it for a day."""
