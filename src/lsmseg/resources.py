"""What this process may use of the machine: memory and CPUs, as a container's limits set them.

Linux reports the host's memory and cores to a process inside a container; the limits set with
``--memory`` and ``--cpus`` are in its cgroup (v2 ``memory.max``/``cpu.max``, or v1's files), and
outside a container in the cgroup a batch scheduler or a systemd slice put it in, or in a parent of
that one. Reading them keeps a tool from planning for a machine it does not have.
"""

from __future__ import annotations

import logging
import math
import os

logger = logging.getLogger(__name__)

# Variables in which a user picks the thread count; lsmseg leaves it to them when one is set.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Which cgroup this process is in, one line per hierarchy: ``0::/path`` (v2), ``4:memory:/path`` (v1).
PROC_CGROUP = "/proc/self/cgroup"


def _levels(root: str, controller: str | None) -> list[str]:
    """The cgroup folders whose limits bind this process, its own first, then each parent up to the
    hierarchy's top; those that exist here.

    A limit on a parent (a batch scheduler's job, a systemd slice) binds the process too. In a
    container the process's cgroup is usually the top itself; where it names a path the container
    cannot see, only the top is read.

    Args:
        root: where the cgroup file system is mounted.
        controller: None for the v2 hierarchy (``root``), else a v1 controller (``root/<controller>``).
    """
    top = root if controller is None else os.path.join(root, controller)
    own = ""
    try:
        with open(PROC_CGROUP, encoding="utf-8") as handle:
            for line in handle:
                number, controllers, path = line.rstrip("\n").split(":", 2)
                if (controller is None and number == "0" and not controllers) or (
                        controller is not None and controller in controllers.split(",")):
                    own = path
                    break
    except (OSError, ValueError):
        pass
    parts = [part for part in own.split("/") if part not in ("", ".", "..")]
    levels = (os.path.join(top, *parts[:n]) for n in range(len(parts), -1, -1))
    return [folder for folder in levels if os.path.isdir(folder)]


def _tightest(root: str, controller: str | None, read) -> tuple[bool, float | None]:
    """``(found, tightest)``: whether ``read(folder)`` could read any of :func:`_levels`' folders
    (OSError or ValueError where it cannot), and the smallest limit it returned (None for none:
    ``read`` returns None for a folder without a limit)."""
    found, limits = False, []
    for folder in _levels(root, controller):
        try:
            limit = read(folder)
        except (OSError, ValueError):
            continue
        found = True
        if limit is not None:
            limits.append(limit)
    return found, min(limits, default=None)


def available_memory(cgroup_root: str = "/sys/fs/cgroup", meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes a new allocation can get: Linux's ``MemAvailable``, lowered to the headroom of the
    process's cgroup memory limit where one is set (a container's ``--memory``, which MemAvailable
    does not see), else the physical memory, else None.

    Args:
        cgroup_root: where the cgroup file system is mounted (v2 ``memory.max``/``memory.current``,
            or v1 ``memory/memory.limit_in_bytes``/``memory.usage_in_bytes``).
        meminfo: the kernel's memory report (``MemAvailable``).
    """
    free = None
    try:
        with open(meminfo, encoding="ascii") as report:
            for line in report:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            pass
    headroom = _cgroup_headroom(cgroup_root)
    if headroom is not None:
        free = headroom if free is None else min(free, headroom)
    return free


def _cgroup_headroom(root: str) -> int | None:
    """Bytes left under the cgroup memory limit, or None without a limit (or cgroup files).

    The usage counts the page cache, which the kernel reclaims under the limit: its inactive part
    is left out, as ``docker stats`` does (a container that has read much would seem full)."""
    for controller, limit_file, usage_file, stat_file, inactive_key in (
        (None, "memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file"),
    ):
        def headroom(folder):
            limit, usage = _cgroup_file(folder, limit_file), int(_cgroup_file(folder, usage_file))
            # "max" (v2) or a huge page-rounded number (v1) means no limit.
            if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
                return None
            return max(0, int(limit) - usage + _stat_value(os.path.join(folder, stat_file), inactive_key))

        found, tightest = _tightest(root, controller, headroom)
        if found:
            return tightest
    return None


def _stat_value(path: str, key: str) -> int:
    """One ``key value`` line of a cgroup ``memory.stat`` file (0 when absent or unreadable)."""
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cpu_quota(cgroup_root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs the process's cgroup may use (a container's ``--cpus``: quota over period), or None
    without a limit (or cgroup files).

    Args:
        cgroup_root: where the cgroup file system is mounted (v2 ``cpu.max``: ``"max 100000"`` or
            ``"400000 100000"``; v1 ``cpu/cpu.cfs_quota_us``, -1 for none, over ``cpu/cpu.cfs_period_us``).
    """
    def read_v2(folder):
        quota, period = _cgroup_file(folder, "cpu.max").split()[:2]
        return None if quota == "max" else _ratio(int(quota), int(period))

    def read_v1(folder):
        return _ratio(int(_cgroup_file(folder, "cpu.cfs_quota_us")), int(_cgroup_file(folder, "cpu.cfs_period_us")))

    for controller, read in ((None, read_v2), ("cpu", read_v1)):
        found, tightest = _tightest(cgroup_root, controller, read)
        if found:
            return tightest
    return None


def _cgroup_file(root: str, name: str) -> str:
    """The text of one cgroup file below ``root`` (OSError when it is not there)."""
    with open(os.path.join(root, name), encoding="ascii") as handle:
        return handle.read().strip()


def _ratio(quota: int, period: int) -> float | None:
    """CPUs from a quota and its period; None for what no kernel writes (a period of 0, a negative quota)."""
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs worth a thread each: those the process may run on (its affinity, e.g. ``--cpuset-cpus``),
    at most the cgroup's quota rounded up (:func:`cpu_quota`), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def fit_threads_to_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """Lower PyTorch's intra-op threads (which every engine's default follows) to :func:`usable_cpus`.

    PyTorch counts the host's cores: in a container given 4 of a 64-core host's CPUs it starts 64
    threads, which the quota then throttles (each waits for the others at every layer). A count the
    user chose (:data:`THREAD_VARIABLES`) is kept, and so is one already at or below the limit.

    Returns:
        The new thread count, or None when nothing changed.
    """
    if any(os.environ.get(name) for name in THREAD_VARIABLES):
        return None
    import torch

    cpus = usable_cpus(cgroup_root)
    if torch.get_num_threads() <= cpus:
        return None
    logger.info("using %d thread(s): this process may use %d CPU(s) of the host's %d", cpus, cpus,
                os.cpu_count() or cpus)
    torch.set_num_threads(cpus)
    return cpus
