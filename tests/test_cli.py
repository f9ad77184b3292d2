"""Bad options exit non-zero with one clear line (no traceback)."""

import numpy as np
import pytest

from conftest import run_cli


def _one_line_error(out, *needles):
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in out.stderr
    assert lines[-1].startswith("error:") or "error:" in lines[-1], out.stderr[-1000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def wrong_keys_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "wrong.npz"
    np.savez(path, images=np.zeros((2, 32, 32, 3), np.uint8))
    return path


def _in_process(capsys, *args):
    """``search.cli.main`` in this process (no TensorFlow start-up per case)."""
    from types import SimpleNamespace

    from search import cli

    code = cli.main(list(args))
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


@pytest.mark.parametrize("args, needles", [
    (["extract", "--backbone", "NoSuchNet"], ["unknown backbone", "NoSuchNet"]),
    (["extract", "--resolution", "8", "--weights", "none"], ["resolution must be in 32..1024"]),
    (["extract", "--cut", "last9"], ["unknown cut"]),
    (["extract", "--data", "/nonexistent/cifar.npz"], ["data file not found", "/nonexistent/cifar.npz"]),
    (["search", "--engine", "sklearn"], ["unknown engine", "sklearn"]),
    (["search", "--storage", "not a url"], ["malformed storage URL"]),
    (["search", "--pruner", "sometimes"], ["unknown pruner"]),
    (["search", "--engine", "kerastuner", "--pruner", "median"], ["KerasTuner cannot honour --pruner"]),
    (["search", "--engine", "kerastuner", "--heartbeat", "5"], ["KerasTuner cannot honour --heartbeat"]),
    (["search", "--oracle", "hyperband"], ["--oracle is a KerasTuner option"]),
    (["search", "--workers", "2"], ["--workers > 1 needs --storage"]),
    (["final", "--params", "{not json"], ["--params"]),
    (["evaluate", "--model", "/nonexistent/model.h5"], ["no model at"]),
])
def test_bad_options(args, needles, tiny_npz, capsys, monkeypatch):
    monkeypatch.setenv("CIFAR10_NPZ", str(tiny_npz))
    if args[0] in ("extract", "search", "final"):
        args = [*args, "--val-size", "20"]
    _one_line_error(_in_process(capsys, *args), *needles)


def test_bad_option_in_a_real_process_prints_one_line(tiny_npz):
    """End to end through the interpreter: exit status 2, one line, no traceback."""
    out = run_cli("extract", "--backbone", "NoSuchNet", env={"CIFAR10_NPZ": str(tiny_npz)})
    _one_line_error(out, "unknown backbone")
    ours = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(ours) == 1  # (TensorFlow's own start-up logging aside)


def test_cheap_options_are_checked_before_any_data_is_read(capsys, monkeypatch):
    """Offline and without CIFAR10_NPZ: a bad storage URL is reported, nothing is downloaded."""
    import keras

    monkeypatch.delenv("CIFAR10_NPZ", raising=False)
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", lambda: pytest.fail("data read before options checked"))
    _one_line_error(_in_process(capsys, "search", "--storage", "notaurl://x"), "storage URL")


def test_failed_download_is_one_line(capsys, monkeypatch):
    import keras

    def offline():
        raise Exception("URL fetch failure on https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")

    monkeypatch.delenv("CIFAR10_NPZ", raising=False)
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    _one_line_error(_in_process(capsys, "extract", "--weights", "none"), "set CIFAR10_NPZ or pass --data")


def test_bad_optimizer_in_params_is_one_line(tiny_npz, tmp_path, capsys):
    out = _in_process(capsys, "final", "--data", str(tiny_npz), "--val-size", "20", "--weights", "none",
                      "--resolution", "32", "--reference-resolution", "32", "--cache-dir", str(tmp_path / "c"),
                      "--results", str(tmp_path / "r"),
                      "--quiet", "--params", '{"head": {"optimizer": "rmsprop"}}', "--output", str(tmp_path / "m.h5"))
    _one_line_error(out, "unknown optimizer 'rmsprop'")
    assert not (tmp_path / "m.h5").exists()


def test_wrong_keys(wrong_keys_npz, capsys):
    _one_line_error(_in_process(capsys, "extract", "--data", str(wrong_keys_npz)), "lacks keys")


def test_missing_cache_with_no_build(tiny_npz, tmp_path, capsys):
    out = _in_process(capsys, "search", "--weights", "none", "--resolution", "32", "--no-build", "--val-size", "20",
                  "--cache-dir", str(tmp_path), "--data", str(tiny_npz))
    _one_line_error(out, "no usable cache")


def test_help_explains(capsys):
    from search import cli

    for argv, needles in ((["--help"], ["extract", "search", "final", "report"]),
                          (["search", "--help"], ["--storage", "--engine", "--pruner"])):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert all(n in out for n in needles), out


def test_a_typo_in_params_exits_2_naming_the_valid_keys(capsys, tmp_path):
    out = _in_process(capsys, "final", "--params", '{"tail": {"learning_rate": 0.1}}', "--output",
                      str(tmp_path / "m.h5"))
    assert out.returncode == 2
    _one_line_error(out, "unknown tail parameter(s) ['learning_rate']", "tail_learning_rate")
    assert not (tmp_path / "m.h5").exists()


def test_bench_tail_fix_refuses_an_unknown_parameter_a_bad_value_and_time_trials(capsys, tmp_path):
    out = _in_process(capsys, "bench-tail", "--fix", "learning_rate=0.001", "--results", str(tmp_path))
    assert out.returncode == 2
    _one_line_error(out, "--fix takes NAME=VALUE", "tail_learning_rate")
    out = _in_process(capsys, "bench-tail", "--fix", "shift=wide", "--results", str(tmp_path))
    assert out.returncode == 2
    _one_line_error(out, "--fix shift: 'wide' is not a int")
    out = _in_process(capsys, "bench-tail", "--fix", "shift=1", "--time-trials", "3", "--results", str(tmp_path))
    assert out.returncode == 2
    _one_line_error(out, "--fix holds parameters of the fidelity benchmark")
    assert not (tmp_path / "bench_search.json").exists()


def test_only_active_parameters_are_recorded(tmp_path):
    from search import engines

    params, provenance = engines.resolve_params({"head": {"n_layers": 1, "optimizer": "adam"}}, tmp_path, "any")
    assert params["head"]["n_layers"] == 1 and "units_0" in params["head"]
    assert "units_1" not in params["head"] and "weight_decay" not in params["head"]  # inactive: not recorded
    assert params["tail"]["bn_momentum"] == 0.9  # a fixed setting stays


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    from search import cli

    def boom(args, argv):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "report", boom)
    out = _in_process(capsys, "report")
    assert out.returncode == 1
    _one_line_error(out, "report failed: RuntimeError: disk on fire", "--debug")
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["--debug", "report"])


def test_a_worker_killed_by_a_signal_fails_the_search():
    from search.cli import workers_status

    assert workers_status([0, 0, 0]) == 0
    assert workers_status([0, -9, 0]) == 137  # max() of these was 0: a killed worker went unseen
    assert workers_status([0, 2, -15]) == 2


def test_compare_reads_runs_by_name(tmp_path, capsys):
    import json

    from test_compare import _run

    for name, seed in (("a", 0), ("b", 1)):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "final.json").write_text(json.dumps(_run(seed, 0.88, 0.87)))
    out = _in_process(capsys, "compare", "a", "b", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    seeds = json.loads((tmp_path / "seeds.json").read_text())
    assert [r["label"] for r in seeds["runs"]] == ["a", "b"]
    _one_line_error(_in_process(capsys, "compare", "nosuch", "--results", str(tmp_path)), "no run named 'nosuch'")
    _one_line_error(_in_process(capsys, "final", "--name", "../escape"), "--name must be")


def test_bad_time_budget_and_folds_are_one_line(capsys):
    _one_line_error(_in_process(capsys, "search", "--time-budget", "0"), "--time-budget must be a positive")
    _one_line_error(_in_process(capsys, "search", "--folds", "0"), "--folds must be at least 1")


def test_search_rate_makes_a_short_phase_2_budget_search_the_tail_rate(tiny_npz, tmp_path, capsys):
    """A phase-2 search whose trials train less than the final holds the tail rate at its default
    (one value, recorded so); ``--search-rate`` searches it anyway, and the budget says which."""
    import optuna

    from search import space

    common = ["search", "--phase", "tail", "--weights", "none", "--resolution", "32", "--val-size", "20",
              "--data", str(tiny_npz), "--cache-dir", str(tmp_path / "cache"), "--results", str(tmp_path / "results"),
              "--tail-trials", "1", "--tail-rows", "50", "--tail-max-epochs", "1", "--folds", "1", "--quiet"]
    storage = f"sqlite:///{tmp_path / 'results' / 'study.db'}"
    rates = {}
    for name, extra in (("held", []), ("searched", ["--search-rate"])):
        assert _in_process(capsys, *common, "--study-name", name, *extra).returncode == 0
        trial = optuna.load_study(study_name=name, storage=storage).trials[0]
        assert trial.user_attrs["budget"]["search_rate"] is (name == "searched")
        dist = trial.distributions["tail_learning_rate"]
        rates[name] = (dist.low, dist.high)
    rate = space.DEFAULT_TAIL["tail_learning_rate"]
    assert rates["held"] == (rate, rate) and rates["searched"][0] < rate < rates["searched"][1]
