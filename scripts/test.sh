#!/usr/bin/env bash
# Set up everything the tests need (virtual environment, dependencies, services) and run the whole suite.
source "$(dirname "$0")/env.sh" test
ruff check src tests benchmarks
ruff format --check src tests benchmarks
exec python -m pytest -q "$@"
