"""``fedsocial bench scale`` (issue 14, item 5): the process-tree memory sampler and the command at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsocial.simulations import bench, proctree, scale_bench

# A parent that holds ~150 MB and starts a child holding ~100 MB; both touch every page (so it is resident)
ALLOCATING_TREE = """
import subprocess, sys, time
block = bytearray(150 * 2**20)
child = subprocess.Popen([sys.executable, "-c",
                          "import time; b = bytearray(100 * 2**20); print('ready', flush=True); time.sleep(30)"],
                         stdout=subprocess.PIPE)
child.stdout.readline()
print("ready", flush=True)
time.sleep(30)
"""


def test_descendants_are_the_root_and_everything_below_it() -> None:
    # Prepare: 1 -> 2 -> 3, 1 -> 4, and 5 -> 6 outside the tree
    parents = {2: 1, 3: 2, 4: 1, 6: 5, 1: 0, 5: 0}
    # Execute / Assert
    assert proctree.compute_descendants(parents, 1) == {1, 2, 3, 4}
    assert proctree.compute_descendants(parents, 3) == {3}


def test_stat_and_smaps_rollup_parsing_known_lines() -> None:
    # Prepare: a process name with a space and a parenthesis; utime 250, stime 50 ticks
    ticks = proctree.CLOCK_TICKS
    stat = f"42 (ray::Client App) x) S 7 42 42 0 -1 4194560 10 0 0 0 {250} {50} 0 0 20 0 3 0 1 2 3"
    rollup = "00400000-7ffd rw-p 00000000 00:00 0 [rollup]\nRss:    204800 kB\nPss:    102400 kB\nShared_Clean: 1 kB\n"
    # Execute
    ppid, cpu = proctree.parse_stat(stat)
    rss, pss = scale_bench.parse_smaps_rollup(rollup)
    # Assert
    assert ppid == 7 and cpu == pytest.approx(300 / ticks)
    assert (rss, pss) == (204800, 102400)


def test_sampler_sees_the_memory_of_a_grandchild_and_stop_ends_the_tree() -> None:
    # Prepare: a real two-process tree holding about 250 MB in all
    proc = subprocess.Popen([sys.executable, "-c", ALLOCATING_TREE], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        sampler = scale_bench.TreeSampler(proc.pid, 0.05)
        # Execute
        sampler.sample()
        pids = sampler.live()
        proctree.stop_processes(pids, grace_s=5.0)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Assert: both processes were counted, the sum holds both blocks, and neither survives the stop
    assert len(pids) == 2 and sampler.peak_processes == 2
    assert sampler.peak_pss_kb >= 240 * 1024 and sampler.peak_rss_kb >= sampler.peak_pss_kb
    time.sleep(0.2)
    assert sampler.live() == []


def test_overrides_keep_a_hundred_steps_an_epoch_and_refuse_tiny_partners() -> None:
    # Execute
    sets = scale_bench.compute_scale_overrides(200000, 5, 100000)
    # Assert
    assert "data.n_users=1000000" in sets and "data.n_items=100000" in sets
    assert "train.batch_size=2000" in sets and "federation.local_batch_size=2000" in sets
    with pytest.raises(scale_bench.ConfigError, match="users-per-partner"):
        scale_bench.compute_scale_overrides(50, 5, 1000)


def test_growth_is_relative_to_the_first_size() -> None:
    points = [{"users_per_partner": 10, "wall_s": 2.0}, {"users_per_partner": 40, "wall_s": 5.0}]
    assert scale_bench.compute_growth(points, ("wall_s", "absent")) == {"users_per_partner": [1.0, 4.0],
                                                                          "wall_s": [1.0, 2.5]}


@pytest.mark.slow  # runs a federation (or Flower's local runtime)
def test_bench_scale_runs_one_dp_round_at_a_tiny_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: 2 partners x 100 users, 300 items: the real `fedsocial simulate` child (Flower on Ray)
    out = tmp_path / "scale"
    # Execute
    code = bench.main(["scale", "--users-per-partner", "100", "--partners", "2", "--items", "300", "--cpus", "1",
                       "--poll", "0.2", "--timeout", "300", "--out", str(out), "--json"])
    # Assert: one JSON object on the last line; the round completed under DP; memory and time were measured
    doc = json.loads(capsys.readouterr().out.splitlines()[-1])
    (point,) = doc["points"]
    assert code == 0, (out / "users_100.log").read_text()
    assert point["exit_code"] == 0 and point["rounds_completed"] == 1 and point["processes_left"] == 0
    assert point["users"] == 200 and point["batch_size"] == 1 and 0 < point["epsilon"] < 8
    assert point["peak_processes"] >= 3  # the driver and at least Ray's raylet and one actor
    assert 0.05 < point["peak_pss_gb"] <= point["peak_rss_gb"] and point["wall_s"] > 0 and point["tree_cpu_s"] > 0
    assert json.loads((out / "scale.json").read_text())["points"][0]["wall_s"] == point["wall_s"]


def test_bench_scale_bad_override_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code = bench.main(["scale", "--users-per-partner", "100", "--set", "model.no_such_key=1", "--out", str(tmp_path)])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and "no_such_key" in err and "Traceback" not in err
    assert not (tmp_path / "users_100").exists()
