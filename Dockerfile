# The image Fly.io builds (fly.toml); any container platform can use it. The
# process to run is chosen by the platform: `ai-jobs worker` or `ai-jobs web`.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml README.md requirements.txt ./
COPY listener listener
COPY sql sql
COPY triggers triggers
RUN pip install -r requirements.txt

# The process runs as nobody, who may write nothing of /app: the default
# STORAGE_URL (.storage, under the working directory) is made here and given to
# it. Results there last as long as the machine; on a PaaS set STORAGE_URL to a
# mounted volume or to supabase://<project host>/<bucket>.
RUN install -d -o nobody -g nogroup -m 0755 /app/.storage

USER nobody
CMD ["ai-jobs", "worker"]
