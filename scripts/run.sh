#!/usr/bin/env bash
# The main job: set up, then run the kvtier cache server on the embedded default (memory + local disk under
# ~/.cache/kvtier/disk): ZMQ data plane on 127.0.0.1:5555, HTTP admin and metrics on 127.0.0.1:8080.
# Extra arguments go to `kvtier server`, e.g. --l1-size-gb 20 --eviction-policy LRU --chunk-size 256.
source "$(dirname "$0")/env.sh" fast
exec kvtier server "$@"
