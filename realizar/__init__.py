"""realizar: an LLM inference server with a built-in load-testing toolkit."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("realizar")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
