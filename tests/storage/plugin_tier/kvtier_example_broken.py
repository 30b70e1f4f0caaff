"""A tier whose client library is not installed: kvtier must say which distribution to reinstall."""

import kvtier_library_that_is_not_installed  # noqa: F401


def create_tier(url, config, metrics):  # type: ignore[no-untyped-def]
    raise AssertionError("never reached")
