# The gateway image: `smallfirst serve` on port 8000 as a non-root user. Nothing in the root
# filesystem is written at run time (bytecode is compiled at build time; HOME and the cache
# point at /tmp, an emptyDir in the chart), so it runs with readOnlyRootFilesystem.
#   docker build -t smallfirst .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The environment gets no pip of its own: the build stage's pip installs into it.
RUN python -m venv --without-pip /opt/smallfirst
# The serving subset of requirements.lock (same pins, same hashes; `make lock` writes both),
# so the image carries no test, training or linting packages.
COPY requirements-serve.lock ./
RUN pip --python /opt/smallfirst/bin/python install --require-hashes -r requirements-serve.lock
# The project as a wheel: its package data carries the router bundles, the embedding
# tokenizer and activation ranges, and the CLI's templates.
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY router router
COPY tooling tooling
COPY load load
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip --python /opt/smallfirst/bin/python install --no-deps /wheels/smallfirst-*.whl

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /tmp smallfirst
COPY --from=build /opt/smallfirst /opt/smallfirst
# The shipped policies; the chart mounts its policies ConfigMap over this folder.
COPY policies/*.yaml /etc/smallfirst/policies/
ENV PATH=/opt/smallfirst/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    SMALLFIRST_CACHE_DIR=/tmp/smallfirst \
    SMALLFIRST_HOST=0.0.0.0 \
    SMALLFIRST_PORT=8000 \
    SMALLFIRST_POLICIES=/etc/smallfirst/policies \
    LITELLM_LOCAL_MODEL_COST_MAP=True
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SMALLFIRST_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["smallfirst"]
CMD ["serve"]
