# clipdense image for the Ray pods and the retraining CronJob (k8s/). The code is installed here from
# the repository; manifests carry only the command and the job config.
#   docker build -t REGISTRY/clipdense:0.1.0-cpu .
#   docker build --build-arg VARIANT=cuda -t REGISTRY/clipdense:0.1.0-cuda .
# Object-storage credentials come from a Kubernetes Secret at run time, never from the image.
FROM python:3.11-slim-bookworm

# cpu: torch's CPU wheels (small); cuda: torch's CUDA wheels, which bring their own CUDA runtime
# (the node needs only the NVIDIA driver and device plugin).
ARG VARIANT=cpu
ARG CUDA_WHEELS=cu128

# KubeRay's default probes of Ray pods run wget inside the container.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# uid 1000, as in the rayproject images, so the manifests' runAsNonRoot holds.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray
WORKDIR /home/ray/clipdense

COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY jobs ./jobs

# Ray is pinned (pyproject.toml only sets a floor) to the RayJob's rayVersion (k8s/base/rayjob-label.yaml):
# KubeRay chooses version-dependent settings of the cluster from rayVersion, so it must name the Ray the
# pods run, and an image built later must not bring a newer one.
# tests/test_k8s.py checks that the two agree.
RUN case "$VARIANT" in \
        cpu) wheels=cpu ;; \
        cuda) wheels="$CUDA_WHEELS" ;; \
        *) echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/$wheels" \
        "torch==2.14.1" "torchvision==0.29.1" \
    && pip install --no-cache-dir . "ray[default,train]==2.60.0"

USER 1000
ENV PYTHONUNBUFFERED=1
CMD ["clipdense", "--help"]
