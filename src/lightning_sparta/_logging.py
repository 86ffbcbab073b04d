"""The package's console output: one ``logging`` hierarchy and warnings that point at the user's code.

Everything the package prints goes through the ``lightning_sparta`` logger or one of its children
(``lightning_sparta.strategy``, ``lightning_sparta.sparta_mask``, ``lightning_sparta.privacy``), on rank
0 only. At the default level (``INFO``) a run prints short summaries; ``DEBUG`` adds the full tables
(which are also written as files to the log directory); ``WARNING`` silences everything but warnings::

    import logging
    logging.getLogger("lightning_sparta").setLevel(logging.WARNING)  # quiet
    logging.getLogger("lightning_sparta").setLevel(logging.DEBUG)    # full tables on the console too

Like Lightning's own logger, the package logger gets a console handler when the root logger has none
(then it does not propagate, so messages are not printed twice); configure ``logging`` before importing
the package to route them elsewhere.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from lightning.pytorch.utilities.rank_zero import rank_zero_only

PACKAGE_LOGGER = "lightning_sparta"

_root = logging.getLogger(PACKAGE_LOGGER)
if _root.level == logging.NOTSET:
    _root.setLevel(logging.INFO)
if not logging.getLogger().handlers and not _root.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _root.addHandler(_handler)
    _root.propagate = False

# Frames from these packages are library code: a warning is attributed to the first frame outside them.
_LIBRARIES = ("lightning_sparta", "lightning", "lightning_utilities", "torch", "opacus", "jsonargparse", "timm")


def _library_prefixes() -> tuple[str, ...]:
    prefixes = []
    for name in _LIBRARIES:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            prefixes.append(os.path.dirname(path) + os.sep)
    return tuple(prefixes) or (os.path.dirname(__file__) + os.sep,)


def get_logger(name: str) -> logging.Logger:
    """The logger ``lightning_sparta.<name>``."""
    return logging.getLogger(f"{PACKAGE_LOGGER}.{name}")


def info(logger: logging.Logger, message: str) -> None:
    """Log ``message`` at INFO on rank 0."""
    if rank_zero_only.rank == 0:
        logger.info(message)


def debug(logger: logging.Logger, message: str) -> None:
    """Log ``message`` at DEBUG on rank 0."""
    if rank_zero_only.rank == 0:
        logger.debug(message)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line (the first frame outside the package, Lightning and torch).

    A fresh registry is used for each call, so the same message is shown again in a later run of the same
    process (a notebook cell run twice); ``warnings`` filters (``ignore``, ``error``) still apply.
    """
    prefixes = _library_prefixes()
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(prefixes):
        frame = frame.f_back
    if frame is None:  # called from library code only (e.g. a thread): fall back to the caller
        warnings.warn(message, category, stacklevel=2)
        return
    warnings.warn_explicit(
        message,
        category,
        filename=frame.f_code.co_filename,
        lineno=frame.f_lineno,
        module=frame.f_globals.get("__name__", "__main__"),
        registry={},
        module_globals=frame.f_globals,
    )


def rank_zero_user_warn(message: str, category: type[Warning] = UserWarning) -> None:
    """:func:`warn` on rank 0 only."""
    if rank_zero_only.rank == 0:
        warn(message, category)


def shorten(names: list[str], first: int = 5) -> str:
    """``a, b, c, d, e and 60 more (65 in all)``: the first few names of a long list and a count."""
    shown = ", ".join(str(n) for n in names[:first])
    if len(names) <= first:
        return shown
    return f"{shown} and {len(names) - first} more ({len(names)} in all)"


__all__ = ["PACKAGE_LOGGER", "debug", "get_logger", "info", "rank_zero_user_warn", "shorten", "warn"]
