# The fedbayes app image: Flower 1.42 with torch and this project installed. The superexec-* services of
# docker-compose.yml run it as `flower-superexec` (the ServerApp and ClientApp processes); the host-network
# overlays (docker-compose.host.yml, ...) also run the SuperLink and SuperNodes from it (`flower-superlink`,
# `flower-supernode`: the flwr package has every role), so one image serves the whole federation.
#
# One Dockerfile, two bases (build argument BASE):
#   BASE=flower (default): FROM Flower's official image flwr/superexec:${FLWR_VERSION} (Docker Hub), which already
#     has a venv with flwr; torch comes from the CPU index, the project's dependencies from PyPI.
#       docker build -t fedbayes-superexec .
#       docker build -t fedbayes-superexec:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .   # CUDA torch
#   BASE=debian (offline, one host): FROM ${DEBIAN_IMAGE}, a local Debian image made with debootstrap that already
#     has python3, python3-venv, openssl and openssh-client; the same "app" user (uid/gid 49999, home /app) and
#     venv path (/python/venv) as Flower's images are made here. `make compose-check` does all of it
#     (simulations/compose_check.py).
#
# Wheels (build argument WHEELS_IMAGE, default: none): an image whose root holds wheel files, bind-mounted at
# /wheels while pip runs (not copied: no wheel layer in the app image). When it holds any wheel, pip installs ONLY
# from it (--no-index), so the build needs no index and no network; compose_check.py makes it from the wheels that
# the host's pip resolves (`pip download torch==2.13.0 ...`: the same wheel `make setup` installs).
ARG FLWR_VERSION=1.42.0
ARG BASE=flower
ARG DEBIAN_IMAGE=local/debian:bookworm
ARG WHEELS_IMAGE=scratch

FROM ${WHEELS_IMAGE} AS wheels

FROM flwr/superexec:${FLWR_VERSION} AS base-flower

FROM ${DEBIAN_IMAGE} AS base-debian
ARG FLWR_VERSION
RUN groupadd -g 49999 app \
    && useradd -u 49999 -g 49999 -d /app -M -s /bin/sh app \
    && mkdir -p /app && chown app:app /app \
    && python3 -m venv /python/venv \
    && chown -R app:app /python
ENV PATH=/python/venv/bin:${PATH}
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ -n "$(ls -A /wheels 2>/dev/null)" ]; then src="--no-index --find-links /wheels"; else src=""; fi \
    && python -m pip install --no-cache-dir $src "flwr==${FLWR_VERSION}"
USER app

FROM base-${BASE}
# torch first, from the CPU index by default (a bare `pip install torch` pulls the multi-GB CUDA build).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ -n "$(ls -A /wheels 2>/dev/null)" ]; then src="--no-index --find-links /wheels"; \
    else src="--index-url ${TORCH_INDEX_URL}"; fi \
    && python -m pip install --no-cache-dir $src "${TORCH_SPEC}"

WORKDIR /app
# The project's dependencies before its code, so that a code change reuses this layer (flwr is already in the
# base, without the simulation extra, which a deployment does not need).
COPY --chown=app:app pyproject.toml /tmp/fedbayes/pyproject.toml
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ -n "$(ls -A /wheels 2>/dev/null)" ]; then src="--no-index --find-links /wheels"; else src=""; fi \
    && python -c "import tomllib; d = tomllib.load(open('/tmp/fedbayes/pyproject.toml', 'rb')); \
print('\n'.join(r for r in d['project']['dependencies'] + d['build-system']['requires'] if 'flwr' not in r))" \
       > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir $src -r /tmp/requirements.txt \
    && rm -f /tmp/requirements.txt
COPY --chown=app:app . /app/src
RUN sed -i '/flwr\[simulation\]/d' /app/src/pyproject.toml \
    && python -m pip install --no-cache-dir --no-index --no-deps --no-build-isolation /app/src \
    && rm -rf /app/src \
    && mkdir -p /app/runs /app/data

ENV FEDBAYES_DATA_DIR=/app/data \
    FLWR_DISABLE_UPDATE_CHECK=1
ENTRYPOINT ["flower-superexec"]
