"""What the process may use of the machine: the cgroup CPU quota and the thread count it sets."""

from __future__ import annotations

import os

import pytest
import torch

from lsmseg import resources


def _cgroup(root, files: dict):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "400000 100000\n"}, 4.0),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu.max": "garbage\n"}, None),
    ({"cpu.max": "100000 0\n"}, None),  # a ZeroDivisionError before every command
    ({"cpu.max": "-1 100000\n"}, None),
    ({}, None),
])
def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path, files, expected):
    assert resources.cpu_quota(_cgroup(tmp_path, files)) == expected


def test_usable_cpus_is_the_affinity_lowered_to_the_quota_rounded_up(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert resources.usable_cpus(_cgroup(tmp_path / "none", {})) == 64
    assert resources.usable_cpus(_cgroup(tmp_path / "v2", {"cpu.max": "150000 100000"})) == 2
    assert resources.usable_cpus(_cgroup(tmp_path / "tiny", {"cpu.max": "10000 100000"})) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert resources.usable_cpus(_cgroup(tmp_path / "big", {"cpu.max": "800000 100000"})) == 2


@pytest.fixture
def torch_threads(monkeypatch):
    """torch's thread count as a plain value, so that the test does not change the process's."""
    state = {"threads": 64}
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["threads"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: state.update(threads=n))
    for name in resources.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    return state


def test_threads_lowered_to_a_containers_cpus(tmp_path, torch_threads, caplog):
    # docker run --cpus 4 on a 64-core host: torch would start 64 threads, throttled by the quota.
    root = _cgroup(tmp_path, {"cpu.max": "400000 100000"})
    with caplog.at_level("INFO", logger="lsmseg.resources"):
        assert resources.fit_threads_to_cpus(root) == 4
    assert torch_threads["threads"] == 4 and "using 4 thread(s)" in caplog.text
    assert resources.fit_threads_to_cpus(root) is None  # already within the limit: unchanged


def test_threads_left_alone_without_a_limit_or_when_the_user_chose(tmp_path, torch_threads, monkeypatch):
    assert resources.fit_threads_to_cpus(_cgroup(tmp_path / "none", {"cpu.max": "max 100000"})) is None
    assert torch_threads["threads"] == 64
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert resources.fit_threads_to_cpus(_cgroup(tmp_path / "v2", {"cpu.max": "200000 100000"})) is None
    assert torch_threads["threads"] == 64


def test_the_command_line_fits_threads_before_running(monkeypatch):
    from lsmseg import cli

    called = []
    monkeypatch.setattr(cli, "fit_threads_to_cpus", lambda: called.append(True))
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    assert not called  # --help exits while parsing, before anything is set up
    assert cli.main(["-q", "predict", "/nonexistent/x.tif", "-o", "/tmp/unused-lsmseg-out"]) == 1
    assert called == [True]


def _in_cgroup(tmp_path, monkeypatch, text):
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(text)
    monkeypatch.setattr(resources, "PROC_CGROUP", str(proc))


def test_a_limit_on_the_process_own_cgroup_or_a_parent_counts(tmp_path, monkeypatch):
    # Was read at the top of the hierarchy only: a batch job's or a systemd slice's limit was missed.
    root = tmp_path / "fs"
    _cgroup(root, {"cpu.max": "max 100000", "jobs/cpu.max": "300000 100000",
                   "jobs/job_7/cpu.max": "max 100000", "jobs/job_7/step_0/cpu.max": "max 100000",
                   "memory.max": "max", "memory.current": "0",
                   "jobs/memory.max": "max", "jobs/memory.current": "0",
                   "jobs/job_7/memory.max": "1000000", "jobs/job_7/memory.current": "400000",
                   "jobs/job_7/memory.stat": "inactive_file 100000\n",
                   "jobs/job_7/step_0/memory.max": "max", "jobs/job_7/step_0/memory.current": "0"})
    _in_cgroup(tmp_path, monkeypatch, "0::/jobs/job_7/step_0\n")
    assert resources.cpu_quota(str(root)) == 3.0
    assert resources.available_memory(str(root), str(tmp_path / "no-meminfo")) == 700_000
    _in_cgroup(tmp_path, monkeypatch, "0::/elsewhere/not/visible\n")  # a container seeing only its own top
    assert resources.cpu_quota(str(root)) is None


def test_the_tightest_of_nested_limits_wins_and_v1_controllers_are_followed(tmp_path, monkeypatch):
    root = tmp_path / "fs"
    _cgroup(root, {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
                   "cpu/slice/cpu.cfs_quota_us": "150000", "cpu/slice/cpu.cfs_period_us": "100000",
                   "cpu/slice/me/cpu.cfs_quota_us": "400000", "cpu/slice/me/cpu.cfs_period_us": "100000",
                   "memory/memory.limit_in_bytes": str(2**63 - 4096), "memory/memory.usage_in_bytes": "5",
                   "memory/slice/memory.limit_in_bytes": "9000", "memory/slice/memory.usage_in_bytes": "1000",
                   "memory/slice/me/memory.limit_in_bytes": "5000", "memory/slice/me/memory.usage_in_bytes": "1000"})
    _in_cgroup(tmp_path, monkeypatch, "5:memory:/slice/me\n3:cpu,cpuacct:/slice/me\n0::/\n")
    assert resources.cpu_quota(str(root)) == 1.5
    assert resources.available_memory(str(root), str(tmp_path / "no-meminfo")) == 4000
