#!/usr/bin/env bash
# The main job on the embedded default (memory + local disk): set up, then run. Until the cache server
# lands this is the engine's self-check (store, retrieve from memory and from disk, verify, time);
# extra arguments go to the command, e.g. --tokens 8192 or --cache-policy S3FIFO.
source "$(dirname "$0")/env.sh"
exec kvtier selfcheck "$@"
