"""bench/harness.py's pure parts (interleaving order, medians, the same-result check, goals, tables,
flags, the JSON), and a smoke run of every bench script at its smallest flags, in a subprocess."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH_DIR))
import harness  # noqa: E402  (bench/ is a folder of scripts, not a package: import it from its path)


def recording_variants(log: list, keys=("a", "b", "c"), extra_warmup=None):
    extra_warmup = extra_warmup or {}
    return [
        harness.Variant(
            k,
            k.upper(),
            lambda k=k: log.append(k),
            reset=lambda k=k: log.append(f"reset {k}"),
            extra_warmup=extra_warmup.get(k, 0),
        )
        for k in keys
    ]


# ---- interleaving and medians


def test_rotated_orders_run_every_variant_once_per_round_starting_one_further_along():
    orders = harness.rotated_orders(3, 5)
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2], [1, 2, 0]]
    assert all(sorted(order) == [0, 1, 2] for order in orders)


def test_time_variants_warms_up_then_times_interleaved_with_resets_outside_the_steps():
    log = []
    stats = harness.time_variants(recording_variants(log, extra_warmup={"c": 1}), repeats=3, warmup=1)
    steps = [entry for entry in log if not entry.startswith("reset")]
    # warm-up: one round of all, then c's extra call; then three rotated timed rounds
    assert steps == ["a", "b", "c", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(log[i] == f"reset {log[i + 1]}" for i in range(0, len(log), 2))  # every step has its reset first
    assert set(stats) == {"a", "b", "c"}
    assert all(len(s["samples_ms"]) == 3 and s["p10_ms"] <= s["median_ms"] <= s["p90_ms"] for s in stats.values())


def test_time_variants_rejects_repeated_keys():
    with pytest.raises(ValueError, match="unique"):
        harness.time_variants(recording_variants([], keys=("a", "a")), repeats=1, warmup=0)


def test_summarise_gives_median_and_interpolated_percentiles():
    s = harness.summarise([5.0, 1.0, 4.0, 2.0, 3.0, 100.0])
    assert s["median_ms"] == 3.5
    assert s["p10_ms"] == pytest.approx(1.5) and s["p90_ms"] == pytest.approx(52.5)
    assert s["samples_ms"] == [5.0, 1.0, 4.0, 2.0, 3.0, 100.0]  # in measurement order
    assert harness.percentile([7.0], 0.9) == 7.0


# ---- peak memory


def test_peak_memory_counts_what_a_cpu_step_allocates_and_not_what_it_frees():
    kept = []

    def step():
        kept.append(torch.empty(2**19, dtype=torch.float32))  # 2 MiB, kept
        for _ in range(3):
            torch.empty(2**18, dtype=torch.float32)  # 1 MiB, freed at once

    peak = harness.peak_memory_bytes(harness.Variant("m", "m", step))
    assert 3 * 2**20 <= peak < 4 * 2**20  # the kept 2 MiB + one 1 MiB temporary at a time


# ---- the same-result check


def result_variant(key, value, log=None):
    return harness.Variant(
        key,
        key,
        lambda: torch.tensor(value),
        reset=lambda: log is not None and log.append(key),
        result=lambda out: {"loss": out},
    )


def test_check_same_result_passes_on_agreement_and_skips_variants_without_result():
    log = []
    floor = harness.Variant("floor", "floor", lambda: 1 / 0)  # never run: no result to compare
    harness.check_same_result(
        [result_variant("ref", 2.0, log), result_variant("other", 2.0 + 1e-6, log), floor], "ref", rtol=1e-4
    )
    assert log == ["ref", "ref", "other", "other"]  # reset before and after each checked step


def test_check_same_result_names_the_variant_and_the_tensor_that_differ():
    with pytest.raises(AssertionError, match="other: loss differs from ref's"):
        harness.check_same_result([result_variant("ref", 2.0), result_variant("other", 2.1)], "ref", rtol=1e-4)
    with pytest.raises(ValueError, match="reference 'missing'"):
        harness.check_same_result([result_variant("ref", 2.0)], "missing", rtol=1e-4)


# ---- goals and tables


def test_goals_are_met_at_least_or_at_most_and_unmeasured_goals_say_so():
    speedup, ratio_to_floor = harness.Goal("fastmtl vs eager", 3.0), harness.Goal("over floor", 1.5, at_least=False)
    assert speedup.describe() == "fastmtl vs eager >= 3x" and ratio_to_floor.describe() == "over floor <= 1.5x"
    rows = [speedup.evaluate(3.0), speedup.evaluate(2.9), ratio_to_floor.evaluate(1.6), speedup.evaluate(None)]
    assert [r["met"] for r in rows] == [True, False, False, None]
    assert rows[1] == {"goal": "fastmtl vs eager >= 3x", "target": 3.0, "measured": 2.9, "met": False}
    table = harness.goals_table(rows).splitlines()
    assert table[0] == "| goal | measured | met? |" and table[1] == "|---|---|---|"
    assert table[2:] == [
        "| fastmtl vs eager >= 3x | 3.00x | met |",
        "| fastmtl vs eager >= 3x | 2.90x | MISSED |",
        "| over floor <= 1.5x | 1.60x | MISSED |",
        "| fastmtl vs eager >= 3x | - | not measured |",
    ]
    assert harness.goals_table([]) == ""


def test_a_missed_goal_that_rounds_to_its_target_shows_by_how_much():
    rows = [harness.Goal("memory", 1.0, at_least=False).evaluate(1.00004), harness.Goal("speed", 1.0).evaluate(0.999)]
    assert harness.goals_table(rows).splitlines()[2:] == [
        "| memory <= 1x | 1.00004x | MISSED |",
        "| speed >= 1x | 0.99900x | MISSED |",
    ]


def test_markdown_table_checks_row_widths():
    assert harness.markdown_table(("a", "b"), [(1, "x")]) == "| a | b |\n|---|---|\n| 1 | x |"
    with pytest.raises(ValueError, match="2 cells"):
        harness.markdown_table(("a", "b", "c"), [(1, 2)])


# ---- flags and results


FLAGS = harness.SharedFlags(repeats=30, warmup=5, small_repeats=4, small_warmup=1)


def parse(argv, flags=FLAGS):
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-compile", action="store_true")  # a script's own flag next to the shared ones
    return flags.parse(parser, argv)


def test_shared_flags_defaults_small_defaults_and_explicit_values():
    full, small = parse([]), parse(["--small", "--no-compile"])
    assert (full.repeats, full.warmup, full.small, full.device, full.out) == (30, 5, False, "cpu", None)
    assert (small.repeats, small.warmup, small.no_compile) == (4, 1, True)
    explicit = parse(["--small", "--repeats", "2", "--warmup", "0", "--out", "x.json"])
    assert (explicit.repeats, explicit.warmup, explicit.out) == (2, 0, "x.json")


def test_shared_flags_set_the_threads():
    before = torch.get_num_threads()
    try:
        assert parse(["--threads", "1"]).threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--warmup", "-1"], "--warmup >= 0"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--device", "cuda"], "runs on cpu, got 'cuda'"),
        (["--device", "nonsense"], "--device: expected cpu"),
    ],
)
def test_shared_flags_reject_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_results_json_has_the_machine_the_settings_and_the_results(tmp_path):
    args = parse(["--small", "--out", str(tmp_path / "sub" / "r.json")])
    path = harness.write_results("bench_x", args, [{"value": 1.5}], {"dtype": "float32"})
    payload = json.loads(Path(path).read_text())
    assert set(payload) == {"benchmark", "date", "machine", "settings", "results"}
    assert payload["benchmark"] == "bench_x" and payload["results"] == [{"value": 1.5}]
    assert datetime.datetime.fromisoformat(payload["date"]).tzinfo is not None
    machine = payload["machine"]
    assert {"cpu", "cpu_count", "torch", "torch_num_threads", "fastmtl_build_info", "device"} <= set(machine)
    assert machine["torch"] == torch.__version__ and machine["device"] == "cpu" and "gpu" not in machine
    settings = payload["settings"]
    assert settings == {
        "repeats": 4,
        "warmup": 1,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "small": True,
        "dtype": "float32",
    }


# ---- every bench script, smallest flags (each a few seconds of CPU)

QUICK = ["--small", "--repeats", "2", "--warmup", "0", "--threads", "1"]  # the shared flags: every script takes them
# Per script: its cheapest flags, the header of the table it prints and the rows' first cells (the
# columns and rows stay as they were before the harness).
MTL_STEP_ROWS = (
    "fastmtl plain step (summed loss)",
    "fastmtl exact",
    "fastmtl rep",
    "(a) LibMTL-style loop",
    "(b) torchjd autojac",
    "(c) torchjd autogram",
    "(c') autogram + fastmtl UPGrad",
    "GEMM floor of (a)",
    "GEMM floor of exact",
)
SMOKE_RUNS = {
    "bench_step": (
        QUICK + ["--no-compile"],
        "| variant | median ms | p10 ms | p90 ms | / fastmtl | compile |",
        ("(a) eager", "fastmtl", "(d) gemm floor"),
    ),
    "bench_mtl_step": (
        QUICK,
        "| variant | median ms | p10-p90 ms | time / exact | peak MB | memory / plain |",
        MTL_STEP_ROWS,
    ),
    "bench_arch": (
        QUICK + ["--no-compile"],
        "| variant | median ms | p10 ms | p90 ms | fastmtl faster by |",
        ("loop", "bmm", "fastmtl", "gemm floor", "original", "converted"),
    ),
    "bench_aggregation": (
        QUICK + ["--tasks", "2", "8", "--methods", "UPGrad", "MGDA"],
        "| method | T | fastmtl | torchjd | speedup | fastmtl x64 | torchjd x64 | speedup x64 |",
        ("UPGrad | 2", "MGDA | 2", "UPGrad | 8", "MGDA | 8"),
    ),
}
NEEDS_TORCHJD = {"bench_mtl_step", "bench_aggregation"}


def test_the_smoke_runs_name_existing_scripts():
    # A new bench script on the harness takes QUICK; add it here with its table's header.
    assert set(SMOKE_RUNS) <= {p.stem for p in BENCH_DIR.glob("bench_*.py")}


@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_bench_script_smoke_run(script, tmp_path):
    if script in NEEDS_TORCHJD and importlib.util.find_spec("torchjd") is None:
        pytest.skip("needs torchjd (the test extra)")
    flags, table_header, rows = SMOKE_RUNS[script]
    out = tmp_path / f"{script}.json"
    command = [sys.executable, str(BENCH_DIR / f"{script}.py"), *flags, "--out", str(out)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert table_header in done.stdout
    assert all(f"| {row} |" in done.stdout for row in rows), done.stdout
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == script and payload["results"] and payload["settings"]["repeats"] == 2
