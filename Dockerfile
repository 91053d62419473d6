# One image for every Compensa process: the orchestrator and the example participants.
# docker-compose.yml chooses the role with the `compensa ...` command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what `pip install .` reads (the build context may hold a .venv and caches).
COPY pyproject.toml setup.py README.md ./
COPY orchestrator/ orchestrator/
COPY participants/ participants/
COPY generated/ generated/
COPY protos/ protos/
RUN pip install . && rm -rf build

# The example saga definitions (shipped in the package beside the example
# participants), read by `compensa serve --definitions /app/definitions`.
COPY participants/compensa/examples/definitions/ definitions/

# Run as an unprivileged user; nothing here writes to the image.
RUN useradd --system --no-create-home compensa
USER compensa

CMD ["compensa", "--help"]
