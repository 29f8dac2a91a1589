#!/bin/sh
# Ray Serve's HAProxy with no listener beyond this node: Serve's template binds the stats and Prometheus listeners
# on every interface at fixed ports (`bind *:PORT`, `bind :PORT`), which nothing this project starts may do, and
# which the several nodes of a fake cluster on one host cannot share. Serve runs the binary named by
# RAY_SERVE_HAPROXY_BINARY_PATH with `-f CONFIG` at every start and reload; this moves those two listeners to Unix
# sockets beside CONFIG (its folder is the node's own), then runs the real binary (FACEREC_HAPROXY_BINARY).
set -eu
previous=""
for argument in "$@"; do
    if [ "$previous" = "-f" ]; then
        folder=$(dirname "$argument")
        sed -i -E "s#^([[:space:]]*bind )\*?:([0-9]+)#\1unix@${folder}/listener-\2.sock#" "$argument"
    fi
    previous="$argument"
done
exec "$FACEREC_HAPROXY_BINARY" "$@"
