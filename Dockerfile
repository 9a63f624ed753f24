# detector worker image. The steps mirror the README's setup: CPU torch first, then the package.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# The CPU build: without the pin and the index pip would pull the multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY detector ./detector
RUN pip install '.[fast]' && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /var/lib/detector --create-home detector \
    && mkdir -p /etc/detector
COPY config.yaml /etc/detector/config.yaml

USER detector
WORKDIR /var/lib/detector

# Prometheus metrics, /healthz and /readyz.
EXPOSE 9108

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=4)"]

ENTRYPOINT ["detector"]
CMD ["run", "--config", "/etc/detector/config.yaml"]
