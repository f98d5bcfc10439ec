# taskman, phase 3: one image for the API and the workers (compose.yaml runs both).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY common ./common
COPY phase1_inprocess ./phase1_inprocess
COPY phase2_queue ./phase2_queue
COPY phase3_production ./phase3_production
COPY taskman ./taskman
RUN pip install --no-cache-dir '.[production]' \
    && useradd --system --no-create-home taskman
USER taskman

EXPOSE 8000
# The API only; workers are their own containers. Redis comes from
# TASKMAN_REDIS_URL (without it, serve would start an embedded Redis).
CMD ["taskman", "serve", "--phase", "3", "--host", "0.0.0.0", "--workers", "0"]
