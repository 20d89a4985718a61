"""personalize-worker: Kafka clickstream to Amazon Personalize PutEvents."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One source for the version: pyproject.toml, as installed. The image tag and `--version` read it too.
    __version__ = version("personalize-worker")
except PackageNotFoundError:  # a source tree run without installing (never the image, never `make`)
    __version__ = "0+unknown"
