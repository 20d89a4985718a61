"""personalize-worker: Kafka clickstream to Amazon Personalize PutEvents."""


def __getattr__(name: str) -> str:
    """`__version__`, read on first use: `python -m worker.cli` imports this package before anything else, and
    importlib.metadata (~75M instructions, email, zipfile, csv) would be imported before `run` pauses the
    cyclic GC (cli.main); `run` reads the version later anyway (User-Agent, pw_build_info)."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        # One source for the version: pyproject.toml, as installed. The image tag and `--version` read it too.
        found = version("personalize-worker")
    except PackageNotFoundError:  # a source tree run without installing (never the image, never `make`)
        found = "0+unknown"
    globals()["__version__"] = found
    return found
