"""Issue 11 item 7: errors that surface (one line, exit 2, before Ray), reusable --out, refusals."""

from __future__ import annotations

import logging
import math
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from fedsocial.server.federation import build_metrics
from fedsocial.server.strategy import FedSocialStrategy, compute_failure_reason
from fedsocial.shared.config import Config, ConfigError, load_config
from fedsocial.shared.privacy.noise_key import NOISE_KEY
from fedsocial.simulations import partition_cmd, simulate, train
from fedsocial.simulations.preflight import run_preflight
from fedsocial.simulations.ray_runtime import end_ray_inplace
from fedsocial.simulations.simulate import (
    EXIT_NOTHING_TRAINED,
    OneLineErrors,
    clear_failed_start_inplace,
    compute_failed_start,
    compute_outcome,
    write_config,
)
from tests.test_strategy import NAMES, _good_reply, _Proxy, _registrations


def _csv(folder: Path, rows: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "interactions.csv").write_text("user,item\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    (folder / "social.csv").write_text("user,neighbour\n1,2\n", encoding="utf-8")
    return folder


def test_simulate_refuses_a_malformed_csv_before_ray_in_one_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a CSV whose third line has a stray field; no Ray up (this worker's kept one is shut down)
    data = _csv(tmp_path / "bad", ["1,2", "2,3,4", "3,1"])
    out = tmp_path / "out"
    end_ray_inplace()

    # Execute
    code = simulate.main(["--config", "configs/demo.toml", "--set", "data.format=csv",
                          "--set", f"data.path={data}", "--out", str(out), "--no-progress"])

    # Assert: exit 2, a line or two naming file and line, Ray never started, --out untouched
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert 1 <= len(err) <= 3 and "interactions.csv:3" in err[-1]
    import ray

    assert not ray.is_initialized()
    assert not out.exists()


def test_data_with_no_evaluable_user_is_refused_by_simulate_and_train(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = _csv(tmp_path / "single", [f"{u},{u}" for u in range(1, 31)])  # one interaction per user
    sets = ["--set", "data.format=csv", "--set", f"data.path={data}"]

    sim = simulate.main(["--config", "configs/demo.toml", *sets, "--out", str(tmp_path / "s"), "--no-progress"])
    sim_err = capsys.readouterr().err
    trn = train.main(["--config", "configs/demo.toml", *sets, "--out", str(tmp_path / "t"), "--no-progress"])
    trn_err = capsys.readouterr().err

    assert sim == 2 and trn == 2
    for err in (sim_err, trn_err):
        assert "no user has a test interaction" in err and "split.min_interactions" in err
        assert len(err.strip().splitlines()) == 1


def test_an_infinite_epsilon_cap_with_dp_on_is_refused_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    code = train.main(["--config", "configs/demo.toml", "--set", "privacy.enabled=true",
                       "--set", "privacy.max_epsilon=inf", "--no-progress"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "privacy.max_epsilon" in err[0]
    with pytest.raises(ConfigError, match="privacy.max_epsilon"):
        Config().replace("privacy", enabled=True, max_epsilon=math.inf)
    assert Config().replace("privacy", enabled=False, max_epsilon=math.inf).privacy.max_epsilon == math.inf
    for bad in ("train.lr=nan", "federation.clipping_norm=inf", "privacy.noise_multiplier=1e400"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("configs/demo.toml", [bad])


def _failed_start(run_dir: Path, ledger_line: str = "") -> None:
    """What a start that failed inside the federation leaves: the config, partner state, empty ledgers."""
    write_config(Config(), run_dir)
    (run_dir / "partners" / "partner-0").mkdir(parents=True)
    (run_dir / "partners" / "partner-0" / "privacy_plan.json").write_text("{}", encoding="utf-8")
    (run_dir / "ledgers").mkdir()
    (run_dir / "ledgers" / "partner-0.pub").write_text("key", encoding="utf-8")
    (run_dir / "ledgers" / "partner-0.jsonl").write_text(ledger_line, encoding="utf-8")


def test_a_failed_start_leaves_out_reusable_but_never_wipes_a_release(tmp_path: Path) -> None:
    # Prepare: one failed start with nothing released, one where a partner's release is on record
    clean, charged, mine = tmp_path / "clean", tmp_path / "charged", tmp_path / "mine"
    _failed_start(clean)
    _failed_start(charged, '{"round": 1}\n')
    _failed_start(mine)
    (mine / "notes.txt").write_text("the user's own file", encoding="utf-8")
    parser = simulate.build_parser()

    # Execute / Assert: the clean one is accepted again as --out, and cleared of the leftovers
    cfg, run_dir, resume = simulate.config_from_cli(parser.parse_args(["--config", "configs/demo.toml",
                                                                       "--out", str(clean)]))
    assert compute_failed_start(clean) and not resume
    clear_failed_start_inplace(clean)
    assert list(clean.iterdir()) == []
    # a partner's provisioned DP noise secret survives (no release was made with it), all else goes
    _failed_start(clean)
    (clean / "partners" / "partner-0").mkdir(parents=True, exist_ok=True)
    (clean / "partners" / "partner-0" / NOISE_KEY).write_bytes(b"k" * 32)
    (clean / "server").mkdir()  # so does the server's (regression: it was wiped, and runs keyed alike differed)
    (clean / "server" / NOISE_KEY).write_bytes(b"s" * 32)
    (clean / "server" / "leftover.json").write_text("{}", encoding="utf-8")
    clear_failed_start_inplace(clean)
    assert sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file()) == [
        Path("partners") / "partner-0" / NOISE_KEY, Path("server") / NOISE_KEY]
    # a release on record must be resumed, never restarted; a folder with the user's own files is refused
    assert not compute_failed_start(charged) and not compute_failed_start(mine)
    for folder in (charged, mine):
        with pytest.raises(ConfigError, match="not empty"):
            simulate.config_from_cli(parser.parse_args(["--config", "configs/demo.toml", "--out", str(folder)]))
    _, _, resume = simulate.config_from_cli(parser.parse_args(["--config", "configs/demo.toml",
                                                               "--resume", str(charged)]))
    assert resume and (mine / "notes.txt").is_file()


def test_a_run_where_no_partner_trained_says_so_and_exits_non_zero(tmp_path: Path) -> None:
    # Prepare: every partner refuses the round (budget exhausted: weight 0, unchanged parameters)
    cfg = Config().replace("federation", partners=2, rounds=1, min_partners=2, clipping_norm=1.0)
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, [np.zeros((5, 3), np.float32), np.ones(5, np.float32)],
                                 registrations=_registrations(2))
    zeros = [np.zeros((5, 3), np.float32), np.zeros(5, np.float32)]
    replies = []
    for node in range(2):
        metrics: dict[str, Any] = {"round": 1, "partner_id": f"partner-{node}", "param_names": ",".join(NAMES),
                                   "num_users": 10, "budget_exhausted": 1, "epsilon": 7.9, "delta": 1e-5}
        replies.append((_Proxy(node), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(zeros), 0, metrics)))

    # Execute
    strategy.aggregate_fit(1, replies, [])  # type: ignore[arg-type]
    strategy._finish_round(1, {}, {}, 0)
    doc = build_metrics(cfg, strategy, {}, 1.0, {})
    code, message = compute_outcome(doc)

    # Assert
    assert doc["partners_trained"] == []
    assert code == EXIT_NOTHING_TRAINED
    assert "no partner trained" in message and "partner-0, partner-1" in message
    good: dict[str, Any] = {"round": 1, "partner_id": "partner-0", "param_names": ",".join(NAMES),
                            "num_users": 10, "budget_exhausted": 0}
    strategy.aggregate_fit(1, [(_Proxy(0), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
        _good_reply(np.random.default_rng(0))), 10, good)), replies[1]], [])  # type: ignore[list-item]
    strategy._finish_round(1, {}, {}, 0)
    assert compute_outcome(build_metrics(cfg, strategy, {}, 1.0, {}))[0] == 0


def test_partition_output_holding_users_records_is_owner_only(tmp_path: Path) -> None:
    out = tmp_path / "parts"

    code = partition_cmd.main(["--config", "configs/demo.toml", "--partners", "2", "--out", str(out)])

    assert code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    paths = [p for folder in out.glob("partner_*") for p in [folder, *folder.rglob("*")]]
    assert any(p.name == "interactions.csv" for p in paths)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p


def test_an_unreachable_budget_is_refused_before_ray() -> None:
    # Prepare: a cap no noise can meet (was: every partner's calibration failed inside Ray, 450 lines)
    cfg = load_config("configs/demo.toml", ["privacy.max_epsilon=0.0001", "federation.rounds=1"])

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"privacy.max_epsilon: 0.0001 is out of reach .* noise_multiplier 8192"):
        run_preflight(cfg, None)
    run_preflight(load_config("configs/demo.toml", ["federation.rounds=1"]), None)  # the demo's own cap is fine


def test_a_cap_the_popularity_release_alone_spends_is_refused_before_ray() -> None:
    # Prepare: the release alone (sigma 3: epsilon 1.39 at delta 1e-5) is above the cap of 1
    cfg = load_config("configs/demo.toml", ["privacy.max_epsilon=1.0", "privacy.popularity_noise_multiplier=3"])

    # Execute / Assert: one line naming the key, before any partner starts
    with pytest.raises(ConfigError, match=r"already spent by the releases besides training .*"
                                          r"privacy.popularity_noise_multiplier = 3"):
        run_preflight(cfg, None)
    run_preflight(load_config("configs/demo.toml", ["privacy.max_epsilon=1.0",
                                                    "privacy.popularity_noise_multiplier=6"]), None)


RAY_FAILURE = ("Error(code=2, reason='<class \\'ray.exceptions.RayTaskError(ClientAppException)\\'>:<\\'ray::"
               "ClientAppActor.run() (pid=14291)\\n  File \"flwr/clientapp/client_app.py\", line 144, in __call__\\n"
               "    return self._call(message, context)\\nfedsocial.shared.privacy.accounting.PrivacyConfigError: "
               "max_epsilon 0.0001 unreachable\\n\\nflwr.clientapp.client_app.ClientAppException: \\nException "
               "ClientAppException occurred. Message: max_epsilon 0.0001 unreachable with noise_multiplier <= "
               "10000.0\\'>')")


def test_a_failed_reply_is_recorded_as_the_partners_own_one_line_error(tmp_path: Path) -> None:
    strategy = FedSocialStrategy(Config().replace("federation", partners=2, min_partners=1, clipping_norm=1.0),
                                 tmp_path, NAMES, [np.zeros((5, 3), np.float32), np.ones(5, np.float32)],
                                 registrations=_registrations(2))
    good: dict[str, Any] = {"round": 1, "partner_id": "partner-0", "param_names": ",".join(NAMES),
                            "num_users": 10, "budget_exhausted": 0}
    reply = (_Proxy(0), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(_good_reply(np.random.default_rng(0))),
                               10, good))

    strategy.aggregate_fit(1, [reply], [RuntimeError(RAY_FAILURE)])  # type: ignore[list-item]

    (dropped,) = strategy._round["dropped"]
    assert dropped["reason"] == "no reply: max_epsilon 0.0001 unreachable with noise_multiplier <= 10000.0"
    assert compute_failure_reason("x" * 500).endswith("...") and len(compute_failure_reason("x" * 500)) == 300


def test_flowers_ray_tracebacks_become_one_line_per_distinct_partner_error() -> None:
    # Prepare: what Flower logs for a failed ClientApp (the actor's traceback, then the worker's)
    log_filter = OneLineErrors()
    traceback_text = RAY_FAILURE.replace("\\n", "\n")
    records = [logging.LogRecord("flwr", logging.ERROR, "vce_api.py", 1, msg, None, None)
               for msg in ("An exception was raised when processing a message by RayBackend", traceback_text,
                           "Traceback (most recent call last):\n" + traceback_text, traceback_text)]

    # Execute
    kept = [r for r in records if log_filter.filter(r)]

    # Assert: the header and one line naming the partner's error, once
    assert [r.getMessage() for r in kept] == [
        "An exception was raised when processing a message by RayBackend",
        "a partner's ClientApp failed: max_epsilon 0.0001 unreachable with noise_multiplier <= 10000.0"]


ACTOR_DIED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: ClientAppActor\n\t"
              "actor_id: 0f6c69117622c3eefdd9fada01000000\n\tpid: 3083\n\tnamespace: af87cbe3\n\tip: 192.0.2.2\n"
              "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
              "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes "
              "include: (1) the process was killed by the OOM killer due to high memory usage, (2) ray stop --force "
              "was called, or (3) the worker crashed unexpectedly due to SIGSEGV or another unexpected error.")


def test_a_partner_process_that_died_is_one_line_once_not_rays_paragraph_per_partner() -> None:
    # Regression: a SIGKILLed (or OOM-killed) partner printed Ray's 8-line paragraph on the dead actor, with
    # Flower's header line, once per partner and message, and its 300-character cut in every dropped reason
    # Prepare: what Flower logs when three partners' processes die in one round
    log_filter = OneLineErrors()
    header = OneLineErrors.HEADER
    records = [logging.LogRecord("flwr", logging.ERROR, "vce_api.py", 1, msg, None, None)
               for msg in (header, ACTOR_DIED, header, ACTOR_DIED, header, ACTOR_DIED.replace("3083", "3084"))]

    # Execute
    kept = [r.getMessage() for r in records if log_filter.filter(r)]

    # Assert: the header once and one line that says what happened
    reason = "its process died before replying (killed, out of memory or crashed; Ray worker exit type SYSTEM_ERROR)"
    assert kept == [header, f"a partner's ClientApp failed: {reason}"]
    assert compute_failure_reason(f"Error(code=2, reason='{ACTOR_DIED}')") == reason
    assert compute_failure_reason("The actor died unexpectedly before finishing this task.") == \
        "its process died before replying (killed, out of memory or crashed)"


@pytest.mark.parametrize("command", ["train", "simulate", "partition", "init", "keys", "certs", "recommend"])
@pytest.mark.parametrize("under", [False, True])
def test_an_out_path_blocked_by_a_file_is_one_line_naming_it_and_the_file_is_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, under: bool) -> None:
    # Regression: FileExistsError / NotADirectoryError tracebacks from every command's mkdir
    # Prepare: a file where the output folder (or one of its parents) should be
    from fedsocial.simulations import certs, init_cmd, recommend

    blocker = tmp_path / "taken"
    blocker.write_text("the user's own file\n", encoding="utf-8")
    out = blocker / "sub" if under else blocker
    data = partition_cmd.main(["--config", "configs/demo.toml", "--set", "data.n_users=60", "--set", "data.n_items=40",
                               "--partners", "1", "--out", str(tmp_path / "parts")])
    assert data == 0
    capsys.readouterr()
    argv = {"train": (train.main, ["--config", "configs/demo.toml", "--out", str(out)]),
            "simulate": (simulate.main, ["--config", "configs/demo.toml", "--out", str(out), "--no-progress"]),
            "partition": (partition_cmd.main, ["--config", "configs/demo.toml", "--partners", "1", "--out", str(out)]),
            "init": (init_cmd.main, ["--data", str(tmp_path / "parts" / "partner_0" / "data"),
                                     "--out", str(out / "mine.toml")]),
            "keys": (certs.main_keys, ["--partner", "p1", "--out", str(out)]),
            "certs": (certs.main_certs, ["--out", str(out), "--hosts", "localhost"]),
            "recommend": (recommend.main, [str(tmp_path / "parts" / "partner_0"), "--partner", "partner_0",
                                           "--config", "configs/demo.toml", "--checkpoint", str(tmp_path / "none.npz"),
                                           "--state-dir", str(tmp_path / "state"), "--out", str(out / "r.jsonl")]),
            }[command]
    # Execute
    code = argv[0](argv[1])
    # Assert: exit 2, one line that names the blocked path, the user's file as it was
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("error: ") and str(blocker) in err[-1] and "Traceback" not in "\n".join(err)
    assert blocker.read_text(encoding="utf-8") == "the user's own file\n"


def test_serve_refuses_a_port_outside_1_65535(capsys: pytest.CaptureFixture[str]) -> None:
    # Regression: uvicorn waited forever on --port 99999999
    from fedsocial.simulations import serve

    with pytest.raises(SystemExit) as exit_:
        serve.main(["runs/none", "--partner", "p", "--port", "99999999"])
    assert exit_.value.code == 2 and "--port: must be in 1..65535" in capsys.readouterr().err


def test_simulate_resume_of_a_train_run_folder_is_refused_and_overwrites_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Regression: `simulate --resume` on a `fedsocial train` folder (it has a config.toml) started a whole new
    # federation in it, replacing the training run's metrics.json and config.toml
    # Prepare: a finished centralized run
    run = tmp_path / "trained"
    assert train.main(["--config", "configs/demo.toml", "--set", "data.n_users=60", "--set", "data.n_items=40",
                       "--set", "privacy.enabled=false", "--set", "train.epochs=1", "--no-progress",
                       "--out", str(run)]) == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    # Execute
    code = simulate.main(["--resume", str(run), "--no-progress"])
    # Assert: one line, exit 2, Ray never started, every file of the training run as it was
    err = capsys.readouterr().err.strip().splitlines()
    import ray

    assert code == 2 and len(err) == 1 and "not a simulation run" in err[0]
    assert not ray.is_initialized()
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_ctrl_c_with_threads_that_never_end_stops_ray_and_exits_130_at_once(tmp_path: Path) -> None:
    # Regression (adversarial review): Ctrl-C during `simulate` printed "interrupted" and then hung in
    # threading._shutdown, Flower's and Ray's non-daemon threads alive. Prepare: a process in that state, with a
    # stand-in for the ray module that records its shutdown
    import subprocess
    import sys
    import textwrap
    import time

    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent("""
        import sys, threading, types
        from fedsocial.simulations.common import user_errors
        ray = types.ModuleType("ray")
        ray.is_initialized = lambda: True
        ray.shutdown = lambda: print("ray.shutdown", flush=True)
        sys.modules["ray"] = ray
        threading.Thread(target=threading.Event().wait).start()  # non-daemon, never ends

        @user_errors
        def main(argv=None):
            raise KeyboardInterrupt
        sys.exit(main())
    """))
    # Execute
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    # Assert: Ray stopped, exit 130 within seconds, no traceback
    assert proc.returncode == 130 and time.monotonic() - t0 < 30
    assert proc.stdout.strip() == "ray.shutdown" and proc.stderr.strip() == "interrupted"


def test_a_coloured_ray_traceback_becomes_one_plain_line() -> None:
    # Regression (adversarial review): a partner's error reached the driver's message full of ANSI escape codes
    text = ("\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1, ip=127.0.0.1)\n  File \"x.py\", line 3\n"
            "\x1b[1m\x1b[31mRuntimeError: Storage size calculation overflowed\x1b[0m\n")
    assert compute_failure_reason(text) == "RuntimeError: Storage size calculation overflowed"
