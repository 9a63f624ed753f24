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

# The scoring kernels are compiled (numba, about a minute on 2 cores) into the image, so a
# container starts scoring at once instead of compiling first. site-packages is not this user's
# to write, hence the cache directory.
ENV NUMBA_CACHE_DIR=/var/lib/detector/numba-cache
RUN python -c "from detector.artifact import load_artifact; from detector.cli import DEFAULT_MODEL; \
from detector.config import Config; from detector.engine import Engine; \
a = load_artifact(DEFAULT_MODEL); print(Engine.from_config(a.model, Config(), a.calibration).warm_up())"

# Prometheus metrics, /healthz and /readyz.
EXPOSE 9108

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=4)"]

ENTRYPOINT ["detector"]
CMD ["run", "--config", "/etc/detector/config.yaml"]
