# The Arbor image: every service in compose.yaml runs an `arbor` command from it.
#   docker build -t arbor:latest .
# The base ships a CUDA build of torch that satisfies pyproject's pin, so pip does not fetch another.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TOKENIZERS_PARALLELISM=false ARBOR_HOME=/arbor

WORKDIR /app
COPY pyproject.toml README.md ./
COPY tasks ./tasks
COPY search ./search
COPY memory ./memory
COPY agent ./agent
COPY workers ./workers
COPY arbor ./arbor
RUN pip install ".[deploy]"

# Celery refuses to be comfortable as root; the named volume inherits this folder's owner on first use.
# /data is where compose bind-mounts ./data (problem files, model folders) for `docker compose run --rm cli ...`.
RUN useradd --create-home --uid 1000 arbor && mkdir -p /arbor /data && chown arbor:arbor /arbor /data
USER arbor
VOLUME /arbor

EXPOSE 8000
CMD ["arbor", "--help"]
