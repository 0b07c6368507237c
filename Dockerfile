# qvit-export on NVIDIA's TensorRT stack: x86 + discrete GPU, or Jetson (JetPack 6 / L4T, TensorRT 10.3).
#
#   docker build --build-arg REGISTRY=<NGC registry> -t qvit-export .
#   docker build --build-arg REGISTRY=<NGC registry> --build-arg BASE=base-jetson -t qvit-export:jetson .
#   docker run --gpus all -v "$PWD:/work" qvit-export --ckpt runs/demo/w4a4/best.pt --engine out/w4a4.plan
#
# REGISTRY is NVIDIA's NGC container registry; the images below are its TensorRT release (dgpu) and L4T JetPack
# (jetson) containers. Build the engine on the device it will run on: plans are specific to GPU and TensorRT.
ARG REGISTRY
ARG BASE=base-dgpu
ARG DGPU_IMAGE=nvidia/tensorrt:24.12-py3
ARG JETSON_IMAGE=nvidia/l4t-jetpack:r36.4.0

FROM ${REGISTRY}/${DGPU_IMAGE} AS base-dgpu

FROM ${REGISTRY}/${JETSON_IMAGE} AS base-jetson
# JetPack's image has TensorRT's Python bindings from apt but no pip; its apt sources pin the release.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip && rm -rf /var/lib/apt/lists/*

FROM ${BASE} AS base
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

# Stage 1: build the wheel from the sources alone.
FROM base AS build
WORKDIR /src
COPY pyproject.toml README.md ./
# qvit_export/recipes and qvit_export/calib link to these folders; the wheel carries copies of their files.
COPY models ./models
COPY calib ./calib
COPY qvit_export ./qvit_export
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Stage 2: the runtime: the wheel with the trt extra (the base's TensorRT satisfies it), a non-root user.
FROM base AS runtime
COPY --from=build /wheels /wheels
RUN python3 -m pip install --no-cache-dir "$(ls /wheels/qvit_export-*.whl)[trt]" && rm -rf /wheels \
    && useradd --create-home --uid 1000 qvit
USER 1000
WORKDIR /work
ENTRYPOINT ["qvit-export"]
CMD ["--help"]
