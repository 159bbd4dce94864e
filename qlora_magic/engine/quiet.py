"""Silencing library chatter that would drown a notebook cell: per-matmul notices from bitsandbytes,
deprecation notes that are the libraries' own business, and per-call progress bars of tiny steps."""

from __future__ import annotations

import contextlib
import logging
import warnings


def _not_cast_notice(record):
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _not_kernels_hub_notice(record):
    # An optional faster CPU 4-bit kernel that bitsandbytes would fetch from the Hub; we stay offline.
    return "kernels-community" not in record.getMessage()


def quiet_bnb_warnings():
    """bitsandbytes logs on every 8-bit matmul that fp32 inputs are cast to fp16: thousands of lines a run."""
    for name, keep in (("bitsandbytes.autograd._functions", _not_cast_notice),
                       ("bitsandbytes.backends.cpu.ops", _not_kernels_hub_notice),
                       ("kernels._internals.hf_hub", _not_kernels_hub_notice)):  # its offline-mode note on the same
        logger = logging.getLogger(name)
        if keep not in logger.filters:
            logger.addFilter(keep)
    # transformers 5 renamed gradient checkpointing; PEFT still calls the old names.
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*")


@contextlib.contextmanager
def no_progress_bars():
    """Hide transformers' weight-loading and datasets' map/filter bars (fractions of a second each)."""
    import datasets
    import transformers

    datasets_was_on = datasets.is_progress_bar_enabled()
    transformers_was_on = transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_was_on:
            datasets.enable_progress_bars()
        if transformers_was_on:
            transformers.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_datasets():
    """Reading a local data file: no "Generating train split" bars, and no logged error for a malformed file,
    which the caller reports in one line of its own."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        with no_progress_bars():
            yield
    finally:
        datasets.logging.set_verbosity(level)
