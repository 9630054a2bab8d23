"""The admin dashboard (`ai-jobs web`): pages, live updates, /metrics, /healthz."""
