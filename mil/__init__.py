"""mil: multiple-instance learning on whole-slide tile features."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `mil.Run` without importing torch for every `mil` command
    if name == "Run":
        from mil.run import Run

        return Run
    raise AttributeError(f"module 'mil' has no attribute {name!r}")
