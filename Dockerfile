# xlb: one image for xlb-dpd, xlb-policyd and xlbctl (the command picks which).
#
#   docker build -t xlb:latest .                                  # debian:bookworm-slim
#   docker build --build-arg BASE=xlb-base:bookworm -t xlb:latest .   # a local base image
#
# BASE must be Debian bookworm (python3-bpfcc and linux-headers-amd64 come from it).
# Where no registry can be pulled from, scripts/cluster_test.sh makes xlb-base:bookworm
# with debootstrap. dpd needs SYS_ADMIN, NET_ADMIN, NET_RAW (and BPF, PERFMON where the
# engine knows them) and seccomp unconfined; see docker-compose.yml and docs/cluster.md.
ARG BASE=debian:bookworm-slim
# PEM text of CA certificates pip must trust (a host behind a TLS-inspecting proxy);
# used while building only, not kept in the image.
ARG EXTRA_CA_CERTS=""

# -- build: generate the gRPC code from proto/ and build the xlb wheel ---------------------
FROM ${BASE} AS build
ARG EXTRA_CA_CERTS
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
      printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/build-extra.crt \
      && update-ca-certificates >/dev/null; fi
RUN python3 -m venv /opt/build && /opt/build/bin/pip install -q grpcio-tools wheel
WORKDIR /src
COPY pyproject.toml ./
COPY proto proto
COPY scripts scripts
COPY xlbcore xlbcore
COPY dpd dpd
COPY policyd policyd
COPY lab lab
RUN /opt/build/bin/python -m scripts.gen_proto \
 && /opt/build/bin/pip wheel -q --no-deps -w /wheels .

# -- runtime --------------------------------------------------------------------------------
FROM ${BASE}
ARG EXTRA_CA_CERTS
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# python3-bpfcc: bcc, which dpd's compile step uses (not on PyPI). linux-headers-amd64:
# the headers bcc compiles against when the host's kernel has none of its own (the
# entrypoint links them, see docker/entrypoint.sh). iproute2 for the lab containers'
# routes and for people; bpftool to look at the pinned maps.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends \
      python3 python3-venv python3-bpfcc linux-headers-amd64 iproute2 bpftool \
      mount ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The dependencies first, in a layer of their own: a source change rebuilds only the
# layers below. --system-site-packages: the venv sees Debian's bcc.
COPY pyproject.toml /tmp/pyproject.toml
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
      printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/build-extra.crt \
      && update-ca-certificates >/dev/null; fi \
 && python3 -m venv --system-site-packages /opt/xlb \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && /opt/xlb/bin/pip install -q -r /tmp/requirements.txt \
 && rm -f /tmp/pyproject.toml /tmp/requirements.txt /usr/local/share/ca-certificates/build-extra.crt \
 && update-ca-certificates --fresh >/dev/null
COPY --from=build /wheels /wheels
RUN /opt/xlb/bin/pip install -q --no-deps /wheels/*.whl \
 && rm -rf /wheels \
 && /opt/xlb/bin/pip check \
 && /opt/xlb/bin/python -c 'import bcc, dpd.main, policyd.main, policyd.cli, xlb.dpd.v1.datapath_pb2'
COPY docker/entrypoint.sh /usr/local/bin/xlb-entrypoint
COPY docker/health.py /opt/xlb/bin/xlb-health
ENV PATH=/opt/xlb/bin:$PATH
ENTRYPOINT ["xlb-entrypoint"]
CMD ["xlbctl", "--help"]
