"""The command line end to end at tiny sizes: files written, PNGs valid images, numbers finite;
names as in the Python API (any case), wrong names listing the valid ones, --help for every option;
the core package importing without the apps extra."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from fastmtl.cli import build_parser, main
from fastmtl.cli.names import METHODS

pytest.importorskip("sklearn", reason="the command line needs the apps extra")
pytest.importorskip("matplotlib", reason="the command line needs the apps extra")
pytest.importorskip("tqdm", reason="the command line needs the apps extra")

TINY = ["--train-samples", "256", "--test-samples", "64", "--epochs", "2", "--batch-size", "64", "--hidden", "16", "8"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # something is drawn


def all_finite(value):
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


@pytest.mark.parametrize(
    "method, expected",
    [
        ("upgrad", "UPGrad"),
        ("FAMO", "FAMO"),
        ("dWa", "DWA"),
        ("gradnorm", "GradNorm"),
        ("uw", "UW"),
        ("autolambda", "AutoLambda"),
    ],
)
def test_train_writes_metrics_and_pictures(tmp_path, method, expected, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", method, *TINY, "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["method"] == expected
    assert report["tasks"] == ["left", "right", "sum", "parity"]
    assert all_finite(report) and report["steps"] == 2 * 4
    assert set(report["test_metrics"]["sum"]) == {"rmse", "mae"}
    assert 0 <= report["test_metrics"]["left"]["accuracy"] <= 1
    cosine = report["mean_gradient_cosine"]
    assert len(cosine) == 4 and all(abs(cosine[t][t] - 1) < 1e-6 for t in range(4))
    assert all(-1 - 1e-9 <= c <= 1 + 1e-9 for row in cosine for c in row)
    assert len(report["epoch_train_losses"]) == 2
    for picture in ("training_curves.png", "gradient_cosine.png"):
        assert_png(out / picture)
    assert "ms per step" in capsys.readouterr().out


def test_train_on_synthetic_tasks_in_rep_mode_with_missing_labels_shows_progress(tmp_path, capsys):
    out = tmp_path / "synthetic"
    argv = [
        "train",
        "--data",
        "Synthetic_Tasks",
        "--num-tasks",
        "3",
        "--correlation",
        "0.8",
        "--in-features",
        "10",
        "--method",
        "MGDA",
        "--mode",
        "REP",
        "--missing-fraction",
        "0.2",
        *TINY,
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["tasks"] == ["task0", "task1", "task2"] and report["settings"]["mode"] == "rep"
    assert all_finite(report)
    assert "step" in capsys.readouterr().err  # tqdm's bar
    assert_png(out / "gradient_cosine.png")


def test_compare_writes_table_json_and_chart(tmp_path, capsys):
    out = tmp_path / "compare"
    assert (
        main(
            [
                "compare",
                "--methods",
                "ew",
                "UPGRAD",
                "famo",
                *TINY,
                "--regimes",
                "rich",
                "--speed-rounds",
                "0",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "comparison.json").read_text())
    assert [row["label"] for row in report["rows"]] == ["single-task", "EW", "UPGrad", "FAMO"]
    assert report["rows"][0]["delta_m"] == 0.0
    assert all_finite(report)
    assert all(row["step_ms"] > 0 for row in report["rows"])
    table = (out / "comparison.md").read_text()
    assert table.startswith("| method | left acc. % ↑ | right acc. % ↑ | sum RMSE ↓ | sum MAE ↓ | parity acc. % ↑")
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + 4
    assert_png(out / "comparison.png")
    assert "| UPGrad |" in capsys.readouterr().out


def test_compare_default_regimes_and_the_speed_comparison(tmp_path, capsys):
    out = tmp_path / "compare"
    argv = [
        "compare",
        "--methods",
        "ew",
        "mgda",
        "upgrad",
        *TINY,
        "--labels-per-task",
        "20",
        "--speed-rounds",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads((out / "comparison.json").read_text())
    assert all_finite(report)
    assert report["settings"]["regimes"] == ["rich", "scarce"]  # both by default
    for regime in ("rich", "scarce"):
        rows = [row for row in report["rows"] if row["regime"] == regime]
        assert [row["label"] for row in rows] == ["single-task", "EW", "MGDA", "UPGrad"]
        assert rows[0]["delta_m"] == 0.0
    speed = report["speed"]
    assert [row["method"] for row in speed["rows"]] == ["MGDA", "UPGrad"]  # the aggregators, not EW
    assert all(row["fastmtl_ms"] > 0 and row["loop_ms"] > 0 and row["times_faster"] > 0 for row in speed["rows"])
    assert speed["plain_ms"] > 0 and speed["rounds"] == 2
    text = (out / "comparison.md").read_text()
    assert "**label-rich**: 256 training rows" in text
    # 4 tasks x 20 disjoint labelled rows; trained for as many steps as the rich regime (4 per epoch x 2)
    assert (
        "**label-scarce**: 80 training rows, labelled per task left 20, right 20, sum 20, parity 20; 4 epochs (8 steps)"
    ) in text
    assert "× faster" in text and "| UPGrad |" in text
    assert_png(out / "comparison.png")
    assert "LibMTL" in capsys.readouterr().out


def test_compare_recommender_trains_every_architecture_and_reports_auc(tmp_path):
    out = tmp_path / "recommender"
    argv = [
        "compare",
        "--data",
        "recommender",
        "--train-samples",
        "300",
        "--test-samples",
        "300",
        "--epochs",
        "1",
        "--batch-size",
        "100",
        "--hidden",
        "6",
        "--embedding-dim",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads((out / "comparison.json").read_text())
    assert [row["label"] for row in report["rows"]] == [
        "single-task",
        "SharedBottom EW",
        "SharedBottom UPGrad",
        "MMoE EW",
        "MMoE UPGrad",
        "PLE EW",
        "PLE UPGrad",
    ]
    assert report["speed"] is None and {row["regime"] for row in report["rows"]} == {"rich"}
    for row in report["rows"]:
        assert set(row["metrics"]) == {"click", "conversion", "like"}
        assert all(set(m) == {"auc"} and 0 <= m["auc"] <= 1 for m in row["metrics"].values())
    table = (out / "comparison.md").read_text()
    assert "| method | click AUC ↑ | conversion AUC ↑ | like AUC ↑ | Δm% ↑ | ms/step |" in table
    assert_png(out / "comparison.png")


def test_train_on_the_recommender_with_an_mmoe(tmp_path):
    out = tmp_path / "train"
    argv = [
        "train",
        "--data",
        "recommender",
        "--arch",
        "mmoe",
        "--method",
        "famo",
        "--train-samples",
        "200",
        "--test-samples",
        "200",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--hidden",
        "4",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["arch"] == "MMoE" and report["steps"] == 4 and report["gram_samples"] == 1
    assert set(report["test_metrics"]["conversion"]) == {"auc"}


def test_bench_runs_a_benchmark_at_its_small_size(tmp_path, capsys):
    assert main(["bench", "--only", "bench_step", "--no-compile", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_step.json").read_text())
    assert result["benchmark"] == "bench_step" and result["results"]
    assert "fastmtl" in capsys.readouterr().out  # the benchmark's table


@pytest.mark.parametrize(
    "argv, listed",
    [
        (["train", "--method", "upgradd"], "UPGrad"),
        (["compare", "--methods", "ew", "famo2"], "FAMO"),
        (["train", "--data", "mnist"], "multidigits, synthetic_tasks"),
        (["train", "--mode", "fast"], "exact, rep"),
        (["train", "--arch", "dcn"], "SharedBottom, MMoE, PLE"),
        (["compare", "--regimes", "rich", "poor"], "rich, scarce"),
        (["bench", "--only", "bench_nothing"], "bench_step"),
    ],
)
def test_wrong_names_list_the_valid_ones(argv, listed, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + (["--out", str(tmp_path)] if argv[0] == "bench" else []))
    assert exit_info.value.code == 2
    assert listed in capsys.readouterr().err


def test_bad_option_values_end_with_a_usage_message(capsys):
    for argv in (
        ["train", "--epochs", "0"],
        ["train", "--missing-fraction", "2", *TINY],
        ["train", "--activation", "sigmoid", *TINY],
        ["compare", "--labels-per-task", "1000", *TINY],
        ["compare", "--data", "recommender", "--speed-rounds", "3", *TINY],
        ["compare", "--speed-rounds", "-1", *TINY],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing-fraction" in err and "activation" in err and "labels_per_task" in err
    assert "speed-rounds" in err


@pytest.mark.parametrize(
    "argv, option, says",
    [
        (["--device", "bogus"], "--device", "expected a torch device"),
        (["--device", "meta"], "--device", "a device that holds data"),
        (["--seed", "-1"], "--seed", "expected an int in [0, 4294967295], got -1"),
        (["--seed", "1.5"], "--seed", "expected an int"),
        (["--lr", "inf"], "--lr", "expected a finite number > 0, got inf"),
        (["--lr", "nan"], "--lr", "expected a finite number > 0, got nan"),
        (["--lr", "0"], "--lr", "expected a finite number > 0, got 0"),
    ],
)
@pytest.mark.parametrize("command", ["train", "compare"])
def test_bad_training_options_name_the_option(command, argv, option, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([command, *argv, *TINY, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and says in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # refused before anything ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is valid here")
def test_device_cuda_without_a_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--device", "cuda", *TINY])
    assert exit_info.value.code == 2
    assert "argument --device" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "compare"])
def test_an_out_folder_that_cannot_be_made_is_a_usage_error_before_training(command, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main([command, *TINY, "--out", str(blocker / "results")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out" in err and str(blocker / "results") in err
    assert "Traceback" not in err


def test_autolambda_step_meta_steps_on_another_training_batch_then_steps_the_model():
    from fastmtl import Task
    from fastmtl.cli.training import TrainingConfig, _Step, _validation_batches, build_model
    from fastmtl.data.dataset import MultiTaskDataset

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=generator)
    data = MultiTaskDataset(
        x, {"a": x.sum(1), "b": x[:, 0] - x[:, 1]}, [Task("a", "regression"), Task("b", "regression")]
    )
    config = TrainingConfig(batch_size=16, hidden=(8,), lr=0.05)
    model = build_model(5, data.tasks, config)
    step = _Step(model, "AutoLambda", config, _validation_batches(data, config))
    assert step.method.lr == config.lr and len(step.method.params) == len(list(model.parameters()))
    batch_x, batch_targets = next(iter(data.batches(16)))
    for _ in range(3):
        losses, gram = step(batch_x, batch_targets)
    assert gram is None and losses.shape == (2,)
    assert not torch.equal(step.method.task_weights, torch.ones(2))  # three Adam steps of 1e-4
    assert all(p.grad is not None for p in model.parameters())


def test_every_method_of_the_api_has_a_command_line_name():
    import fastmtl

    for name in METHODS.values():
        assert hasattr(fastmtl.aggregation, name) or hasattr(fastmtl.weighting, name)
    assert {"ew", "uw", "dwa", "mgda", "pcgrad", "cagrad", "upgrad", "nashmtl", "famo"} <= set(METHODS)


def test_help_documents_every_option(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"train", "compare", "bench"}
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"{name}: option {action.option_strings} has no help"
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "--" in capsys.readouterr().out


def test_the_command_line_leaves_the_thread_count_as_it_was(tmp_path):
    import torch

    before = torch.get_num_threads()
    main(["train", "--method", "ew", *TINY, "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    assert torch.get_num_threads() == before


def test_python_dash_m_fastmtl_runs():
    result = subprocess.run([sys.executable, "-m", "fastmtl", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "compare" in result.stdout


def test_core_package_imports_without_the_apps_extra(tmp_path):
    # Hide scikit-learn, matplotlib and tqdm: the core imports; the apps say which extra to install.
    script = textwrap.dedent("""
        import sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("sklearn", "matplotlib", "tqdm"):
                    raise ImportError("hidden: " + name)
        sys.meta_path.insert(0, Hide())
        import fastmtl, fastmtl.data, fastmtl.metrics, fastmtl.plots, fastmtl.cli
        data = fastmtl.data.synthetic_tasks(8, in_features=4)
        try:
            fastmtl.data.multidigits()
        except ImportError as error:
            assert 'pip install "fastmtl-torch[apps]"' in str(error), error
            print("ok")
        try:
            fastmtl.cli.main(["train", "--epochs", "1", "--no-progress", "--out", sys.argv[1]])
        except SystemExit as exit:
            print("exit", exit.code)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "exit", "1"]
    assert 'pip install "fastmtl-torch[apps]"' in result.stderr  # the command line's message, no traceback
    assert "Traceback" not in result.stderr
