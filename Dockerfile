# LLMProxy container image: the gateway (`llmproxy`) and the bundled mock backend (`llmproxy-mock`).
#
#   docker build -t llmproxy .                  (no docker0 bridge on this machine: add --network host)
#   docker run -d --stop-timeout 40 -p 8080:8080 -v "$PWD/config.yaml:/home/llmproxy/config.yaml" \
#     -v llmproxy-usage:/home/llmproxy/data llmproxy
#   (--stop-timeout 40: more than server.drain_timeout's 30 s; the volume keeps undelivered usage
#   records across container replacements; both as in the README's Docker section)
#
# Nothing here is architecture-specific (no architecture paths, packages or binaries: ldd and dpkg
# report the build's own), and every package exists for amd64 and arm64 in Debian 12, so
# `docker buildx build --platform linux/amd64,linux/arm64 .` builds both. scripts/docker-check.sh
# builds and runs this image for amd64; no arm64 base image is reachable here, so
# scripts/arm64-check.sh cross-compiles the same sources against the same Debian packages for arm64
# and serves requests with the result under QEMU.

# ---- builder: the project's own scripts, exactly as on a fresh Debian 12 machine -------------------
FROM debian:bookworm AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# ccache would only fill a layer that is thrown away.
ENV CCACHE_DISABLE=1
WORKDIR /src
# The dependency layer first, so that source edits do not reinstall the tool chain.
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN scripts/install-deps.sh --build && rm -rf /var/lib/apt/lists/*
COPY . .
RUN scripts/build.sh release llmproxy llmproxy-mock \
 && install -d /out/bin \
 && install -m 0755 -s build/llmproxy build/llmproxy-mock /out/bin/
# The Debian packages owning the shared libraries that the binaries link, for the runtime stage, so
# that it cannot miss one. Names without the :ARCH suffix (any architecture); ldd may report /lib/X
# where dpkg knows /usr/lib/X (merged /usr) or the other way round, so both spellings are tried.
RUN ldd /out/bin/* | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u | while read -r lib; do \
      case $lib in /usr/*) alt=${lib#/usr} ;; *) alt=/usr$lib ;; esac; \
      dpkg-query -S "$lib" 2>/dev/null || dpkg-query -S "$alt" 2>/dev/null \
        || { echo "no Debian package owns $lib" >&2; exit 1; }; \
    done | cut -d: -f1 | sort -u >/out/runtime-packages \
 && echo "runtime packages:" $(cat /out/runtime-packages)

# ---- runtime: only the shared libraries, the two binaries and a default configuration -------------
FROM debian:bookworm
COPY scripts/install-deps.sh /tmp/install-deps.sh
COPY --from=builder /out/runtime-packages /tmp/runtime-packages
# install-deps.sh --runtime is the project's declared list (ca-certificates for https:// backends);
# runtime-packages adds whatever the linker needs beyond it.
RUN apt-get -q update \
 && /tmp/install-deps.sh --runtime \
 && xargs -a /tmp/runtime-packages apt-get -q install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/install-deps.sh /tmp/runtime-packages \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/llmproxy \
      --shell /usr/sbin/nologin llmproxy
COPY --from=builder /out/bin/ /usr/local/bin/
COPY deployments/config.yaml /home/llmproxy/config.yaml
# Fails the build if a library is missing or the default configuration does not validate.
RUN chmod 0644 /home/llmproxy/config.yaml \
 && mkdir -p /home/llmproxy/data && chown 10001:10001 /home/llmproxy/data \
 && ! ldd /usr/local/bin/llmproxy /usr/local/bin/llmproxy-mock | grep 'not found' \
 && llmproxy --version && llmproxy --check-config /home/llmproxy/config.yaml

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/llmproxy
# The usage log (usage.log_path: data/usage.db): mount a volume here so that records not yet
# delivered to the webhook survive a container replacement.
VOLUME /home/llmproxy/data
EXPOSE 8080
# GET /health with bash's /dev/tcp: nothing extra installed (no curl in this image). The port is the
# configuration's `listen` port; set LLMPROXY_HEALTHCHECK_PORT when it is not 8080 (the mock: 9000).
ENV LLMPROXY_HEALTHCHECK_PORT=8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${LLMPROXY_HEALTHCHECK_PORT:-8080} && printf 'GET /health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q '^HTTP/1\\.[01] 200 '"]
# SIGTERM drains in-flight streams for up to server.drain_timeout (30 s by default): give
# `docker stop` a longer --time (docker-compose.yml sets stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["llmproxy"]
CMD ["--config", "/home/llmproxy/config.yaml"]
