# The connector in a container: slim Python base, a non-root user, a read-only
# root file system (state in the /var/lib/connector volume, scratch in /tmp).
#
#   docker build -t connector .
#   docker run --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
#     -v connector-state:/var/lib/connector \
#     -v /etc/connector:/etc/connector:ro \
#     connector
#
# Secrets: mount them read-only (e.g. Docker/Kubernetes secrets under /run/secrets)
# and point the config at them, or pass them as environment variables named in
# the config (password_env = "VCENTER_PASSWORD"). See docs/security.md.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY connector ./connector
RUN python -m pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="vm-replication-connector" \
      org.opencontainers.image.description="Incremental, verifiable replication of vSphere VM disks into S3" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 connector \
 && useradd --system --uid 10001 --gid connector --home-dir /var/lib/connector \
      --shell /usr/sbin/nologin connector \
 && install -d -o connector -g connector -m 0700 /var/lib/connector
COPY --from=build /install /usr/local
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONNECTOR_CONFIG=/etc/connector/connector.toml
USER 10001:10001
WORKDIR /var/lib/connector
VOLUME ["/var/lib/connector"]
EXPOSE 8443
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["connector", "health"]
ENTRYPOINT ["connector"]
CMD ["run"]
