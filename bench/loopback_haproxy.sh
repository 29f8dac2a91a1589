#!/bin/sh
# Ray Serve's HAProxy, every listener on loopback: Serve's template binds the stats and Prometheus listeners on
# every interface (`bind *:PORT`, `bind :PORT`), and nothing this project starts may listen beyond 127.0.0.1.
# Serve runs the binary named by RAY_SERVE_HAPROXY_BINARY_PATH with `-f CONFIG` at every start and reload; this
# rewrites those two bind lines in CONFIG, then runs the real binary (FACEREC_HAPROXY_BINARY) in its place.
set -eu
previous=""
for argument in "$@"; do
    if [ "$previous" = "-f" ]; then
        sed -i -E 's/^([[:space:]]*bind )\*?:([0-9]+)/\1127.0.0.1:\2/' "$argument"
    fi
    previous="$argument"
done
exec "$FACEREC_HAPROXY_BINARY" "$@"
