"""The ``fastmft`` commands show their own progress bars only: transformers' ("Loading weights")
and datasets' ("Filter", "Map", "Flattening the indices", ...) would otherwise print before
fastmft's header and even under --no-progress."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Turn off the progress bars of transformers and datasets for this process (the commands call
    this; the library leaves the caller's settings alone)."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
