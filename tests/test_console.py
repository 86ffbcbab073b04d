"""The examples' console: Lightning's advertisement and its pytree deprecation warning are dropped, nothing else."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest

from lightning_sparta.demo import quiet_lightning_notices


def _trainer_messages(caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu")
    return [r.getMessage() for r in caplog.records]


def test_quiet_lightning_notices_drops_the_advertisement_only(caplog):
    lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    saved = list(lightning_info.filters)
    for f in saved:  # another test may have quietened Lightning already
        lightning_info.removeFilter(f)
    try:
        if not [m for m in _trainer_messages(caplog) if "litlogger" in m.lower()]:
            pytest.skip("this Lightning version prints no LitLogger advertisement")
        quiet_lightning_notices()
        quiet_lightning_notices()  # idempotent: one filter
        assert len(lightning_info.filters) == 1
        messages = _trainer_messages(caplog)
        assert not [m for m in messages if "litlogger" in m.lower()], messages
        assert any(m.startswith("GPU available") for m in messages), messages  # the rest is kept
    finally:
        for f in saved:
            lightning_info.addFilter(f)


def test_quiet_lightning_notices_keeps_other_warnings():
    quiet_lightning_notices()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_lightning_notices()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("something about your code", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something about your code"]
