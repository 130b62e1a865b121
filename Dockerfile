# syntax=docker/dockerfile:1
# edgeprobe: one image for the agent, the collector and the responder (docker-compose.yml).
#
#   docker build -t edgeprobe:0.2.0 .
#   docker run --rm edgeprobe:0.2.0 ping 192.0.2.1 -c 3     (entrypoint: the edgeprobe CLI)
#
# Runs as the unprivileged user "edgeprobe" (uid/gid 10001), never as root. ICMP needs either
#   * nothing: net.ipv4.ping_group_range covering gid 10001 (ICMP datagram sockets; Docker >= 20.10
#     sets "0 2147483647" in every container by default, or: --sysctl net.ipv4.ping_group_range="10001 10001"), or
#   * CAP_NET_RAW only (raw sockets): run with --cap-drop ALL --cap-add NET_RAW and the entrypoint
#     python3-netraw -m edgeprobe.cli, the one binary in the image with a file capability
#     (cap_net_raw=ep; a capability added with --cap-add never reaches a non-root process by itself).
#     It refuses to start without NET_RAW in the container's bounding set and under no-new-privileges.
FROM python:3.11.9-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY src/ src/
COPY probes/ probes/
COPY agent/ agent/
COPY collector/ collector/
COPY grafana/ grafana/
# The image runs the collector too, so it takes the [collector] extra; every version from the lock.
RUN pip install --no-compile -c requirements.lock '.[collector]' \
    && cd / && rm -rf /src

RUN apt-get update \
    && apt-get install -y --no-install-recommends libcap2-bin \
    && cp "$(readlink -f /usr/local/bin/python3)" /usr/local/bin/python3-netraw \
    && setcap cap_net_raw=ep /usr/local/bin/python3-netraw \
    && apt-get purge -y libcap2-bin \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 edgeprobe \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/edgeprobe --create-home \
       --shell /usr/sbin/nologin edgeprobe

USER 10001:10001
WORKDIR /var/lib/edgeprobe
ENTRYPOINT ["edgeprobe"]
CMD ["--help"]
