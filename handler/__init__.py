"""sdfunc's HTTP function: app factory, A1111-compatible routes, schemas, errors, logging."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sdfunc")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
