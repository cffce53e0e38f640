# The fedbayes app image: Flower's SuperExec (which starts the ServerApp and ClientApp processes) with torch and
# this project installed. Used by the superexec-* services of docker-compose.yml.
#
#   docker build -t fedbayes-superexec .                                      # CPU torch (default)
#   docker build -t fedbayes-superexec:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .   # CUDA torch
#
# The app code itself reaches the SuperExec inside the FAB that `flwr run` submits; installing the project here
# provides its dependencies (and the `fedbayes` command, e.g. for `fedbayes data fetch`).
ARG FLWR_VERSION=1.42.0
FROM flwr/superexec:${FLWR_VERSION}

# torch first, from the CPU index by default (a bare `pip install torch` pulls the multi-GB CUDA build).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m pip install --no-cache-dir "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY --chown=app:app . /app/src
# flwr is already in the base image (without the simulation extra, which a deployment does not need).
RUN sed -i '/flwr\[simulation\]/d' /app/src/pyproject.toml \
    && python -m pip install --no-cache-dir /app/src \
    && rm -rf /app/src \
    && mkdir -p /app/runs /app/data

ENV FEDBAYES_DATA_DIR=/app/data \
    FLWR_DISABLE_UPDATE_CHECK=1
ENTRYPOINT ["flower-superexec"]
