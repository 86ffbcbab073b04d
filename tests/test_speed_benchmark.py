"""Tests for the aggregation in ``benchmarks/speed.py`` (the timing itself is not tested: tests time nothing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("speed_benchmark", ROOT / "benchmarks" / "speed.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["speed_benchmark"] = module
    spec.loader.exec_module(module)
    return module


def _run(model: str, row: str, steps: list[tuple[int, float]]) -> dict:
    cpu = sum(c for _, c in steps)
    samples = sum(n for n, _ in steps)
    return {
        "model": model,
        "row": row,
        "steps": [(n, c, c) for n, c in steps],  # (samples, wall s, CPU s)
        "samples_per_cpu_s": samples / cpu,
        "cpu_seconds": cpu,
    }


def test_median_run_and_pooled_step_median(speed) -> None:
    # three runs of 3 steps; run 2 has a burst (one step 10x slower) that drags its mean down
    runs = [
        _run("m", "dp", [(10, 1.0), (10, 1.1), (10, 0.9)]),
        _run("m", "dp", [(10, 1.0), (10, 10.0), (10, 1.0)]),
        _run("m", "dp", [(20, 2.4), (10, 1.2), (10, 1.3)]),
    ]
    result = speed.median_run(runs)
    # means: 10.0, 2.5 and 8.0 samples/CPU-s -> the median run is the third one
    assert result["samples_per_cpu_s"] == pytest.approx(40 / 4.9)
    assert result["repeat_samples_per_cpu_s"] == [r["samples_per_cpu_s"] for r in runs]
    # per-sample ms of the 9 steps: 100, 110, 90, 100, 1000, 100, 120, 120, 130 -> median 110
    assert speed.pooled_step_ms(result) == pytest.approx(110.0)
    # a single run's own steps when there are no repeats
    assert speed.pooled_step_ms(runs[0]) == pytest.approx(100.0)


def test_spread_section_reports_the_pooled_ratio(speed) -> None:
    plain = speed.median_run([_run("m", "non-private", [(10, 0.5)] * 3), _run("m", "non-private", [(10, 0.6)] * 3)])
    dp = speed.median_run([_run("m", "dp", [(10, 1.0)] * 3), _run("m", "dp", [(10, 1.0), (10, 9.0), (10, 1.0)])])
    text = speed.spread_section([plain, dp], repeats=2)
    # non-private steps: 50, 50, 50, 60, 60, 60 ms -> median 55; dp: 100 (x5), 900 -> median 100
    assert "m / dp: " in text
    assert "pooled step median 100.0 CPU-ms per sample, 0.55× non-private" in text
    assert speed.spread_section([_run("m", "dp", [(10, 1.0)])], repeats=1) == ""


def test_help_prints(speed, capsys) -> None:
    """`--help` crashed: argparse formats help strings with %, and the row names hold "20%"."""
    with pytest.raises(SystemExit) as stop:
        speed.parse_args(["--help"])
    assert stop.value.code == 0
    assert "sparta-sparse-20%" in capsys.readouterr().out


def test_torchvision_vit_row_times_the_attention_ghost_form(speed) -> None:
    """`--models vit_tv` builds torchvision's ViT at DeiT-tiny's width, whose attention has a ghost form, and
    runs only the rows that time it."""
    from torchvision.models.vision_transformer import VisionTransformer

    from lightning_sparta.privacy.clipping import has_ghost_form

    model = speed.build_model("vit_tv", depth=1)
    assert isinstance(model, VisionTransformer)
    assert has_ghost_form(model.encoder.layers[0].self_attention)
    assert set(speed.MODEL_ROWS["vit_tv"]) <= set(speed.ROWS)
    assert "vit_tv" not in speed.DEFAULT_MODELS


def test_allocator_is_preloaded_into_every_row_and_checked(speed, monkeypatch, capsys) -> None:
    """`--allocator tcmalloc` preloads the library into the rows' processes (keeping a user's own preload),
    refuses by name when the library is missing, and a row reads the allocator back from its memory map."""
    monkeypatch.setattr(speed, "_loadable", lambda library: True)
    args = speed.parse_args(["--allocator", "tcmalloc", "--device", "cpu"])
    monkeypatch.setenv("LD_PRELOAD", "libmine.so")
    env = speed._child_env(args)
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libmine.so"
    assert env["OMP_NUM_THREADS"] == "1"
    assert "--allocator" in speed._child_command(args, "deit", "non-private", "out.json")
    monkeypatch.delenv("LD_PRELOAD")
    assert "LD_PRELOAD" not in speed._child_env(speed.parse_args(["--device", "cpu"]))

    monkeypatch.setattr(speed, "_loadable", lambda library: False)
    with pytest.raises(SystemExit):
        speed.parse_args(["--allocator", "jemalloc", "--device", "cpu"])
    assert (
        "--allocator jemalloc: libjemalloc.so.2 not found (Debian: apt install libjemalloc2)" in capsys.readouterr().err
    )

    maps = "7f00-7f01 r-xp 0 00:00 0 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n"
    monkeypatch.setattr(speed.Path, "read_text", lambda self: maps)
    assert speed._mapped_allocator() == "tcmalloc"
    monkeypatch.setattr(speed.Path, "read_text", lambda self: "7f00-7f01 r-xp 0 00:00 0 /usr/lib/libc.so.6\n")
    assert speed._mapped_allocator() == "glibc"


def test_glibc_tuned_sets_mallocs_variables_in_every_row_and_only_there(speed, monkeypatch) -> None:
    """`--allocator glibc-tuned` keeps glibc's malloc and passes its two tuning variables to the rows'
    processes; the other allocators run without them, even when the caller's shell has them set."""
    tuned = speed._child_env(speed.parse_args(["--allocator", "glibc-tuned", "--device", "cpu"]))
    assert {k: tuned[k] for k in speed.GLIBC_TUNED_ENV} == speed.GLIBC_TUNED_ENV
    assert "LD_PRELOAD" not in tuned or "malloc" not in tuned["LD_PRELOAD"]
    for key, value in speed.GLIBC_TUNED_ENV.items():
        monkeypatch.setenv(key, value)
    plain = speed._child_env(speed.parse_args(["--device", "cpu"]))
    assert not set(speed.GLIBC_TUNED_ENV) & set(plain)
    monkeypatch.setattr(speed.Path, "read_text", lambda self: "7f00-7f01 r-xp 0 00:00 0 /usr/lib/libc.so.6\n")
    assert speed._mapped_allocator() == "glibc-tuned"  # a row reads the variables back
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert speed._mapped_allocator() == "glibc"
