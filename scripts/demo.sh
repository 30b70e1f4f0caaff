#!/usr/bin/env bash
# The two-request check through a real model (SmolLM2-135M-Instruct, prepared once from its wheel): the first
# request stores its KV, the second (the same prompt extended) retrieves it; both TTFTs are printed.
# Extra arguments go to `kvtier demo`, e.g. --server-url tcp://127.0.0.1:5555 to use a running `kvtier server`.
source "$(dirname "$0")/env.sh" hf
exec kvtier demo "$@"
