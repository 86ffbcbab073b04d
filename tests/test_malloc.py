"""``DPStrategy(tune_malloc=...)``: glibc keeps a step's freed memory instead of faulting it in again.

The effect is measured with the kernel's own count of minor page faults (``getrusage``), in child
processes, since the setting is process-wide: a round of allocations that the previous round freed
should fault its pages in again under glibc's defaults and not at all once the thresholds are set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_sparta import DPStrategy, _malloc
from test_strategy import TinyModule, _trainer

SRC = str(Path(__file__).resolve().parents[1] / "src")
GLIBC = _malloc._glibc() is not None

# One "step": 128 tensors of 1 MB, written, then all freed. Before the steps a 4 MB block is allocated
# and freed, as the large blocks of a run's first steps are: glibc then serves 1 MB blocks from its heap,
# and at the end of each step hands the 128 MB freed at the top of the heap back to the system, so that
# the next step faults every page in again, as a DP step did.
_ROUNDS = """
import resource, sys, torch
from lightning_sparta import _malloc
tuned = _malloc.keep_freed_memory() if sys.argv[1] == "tune" else False
torch.ones(1 << 20)  # 4 MB, freed at once
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step = [None] * 128  # the list before the tensors: nothing of Python's above them on the heap
    for i in range(128):
        step[i] = torch.ones(1 << 18)
    step.clear()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, min(faults[1:]))
"""


def _faults_per_round(mode: str, **env: str) -> tuple[bool, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    environment["PYTHONPATH"] = SRC + os.pathsep + environment.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_ROUNDS), mode],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not GLIBC, reason="tune_malloc sets glibc's malloc thresholds; this C library is not glibc")
def test_kept_memory_is_reused_without_page_faults():
    tuned, tuned_faults = _faults_per_round("tune")
    assert tuned
    # Untuned, about one process in five (on this VM) keeps the heap's top, presumably because some small
    # block still held or cached lies above the tensors. Three processes make a miss unlikely.
    for _ in range(3):
        plain_tuned, plain_faults = _faults_per_round("plain")
        assert not plain_tuned
        if plain_faults > 128 * 256 // 2:
            break
    else:
        pytest.skip(f"untuned glibc kept the heap in three processes ({plain_faults} faults): nothing to compare")
    # 128 MB is 32,768 pages of 4 KB: each is faulted in again without the thresholds, none with them
    assert tuned_faults < plain_faults / 20, (tuned_faults, plain_faults)


@pytest.mark.skipif(not GLIBC, reason="tune_malloc sets glibc's malloc thresholds; this C library is not glibc")
def test_users_malloc_settings_are_left_alone():
    tuned, _ = _faults_per_round("tune", MALLOC_TRIM_THRESHOLD_="131072")
    assert not tuned


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_ set in the environment"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES set in the environment"),
        ({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, "tcmalloc preloaded"),
    ],
)
def test_why_not_tuned_names_the_users_choice(monkeypatch, env, reason):
    if not GLIBC:
        pytest.skip("not glibc: every other reason is moot")
    for key in ("LD_PRELOAD", "GLIBC_TUNABLES", *_malloc._USER_SETTINGS):
        monkeypatch.delenv(key, raising=False)
    assert _malloc.why_not_tuned() is None
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _malloc.why_not_tuned() == reason


@pytest.mark.parametrize("tune", [True, False])
def test_strategy_tunes_on_cpu_and_gives_the_memory_back_at_teardown(monkeypatch, tune):
    calls: list[str] = []
    monkeypatch.setattr("lightning_sparta.strategy.keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr("lightning_sparta.strategy.release_freed_memory", lambda: calls.append("release"))
    strategy = DPStrategy(noise_multiplier=1.0, tune_malloc=tune)
    _trainer(strategy).fit(TinyModule(batch_size=6))
    assert calls == (["keep", "release"] if tune else [])
