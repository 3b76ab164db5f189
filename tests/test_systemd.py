"""sd_notify against a real datagram socket, the watchdog under MockClock, and the unit file."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from caired.config import Config
from caired.errors import ExitCode
from caired.frames import encode_workers
from caired.systemd import Notifier, serve_watchdog
from tests.conftest import BackendFactory, cli_env, write_frames

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "caired.service"
SAMPLE = ROOT / "etc" / "caired.toml"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on the socket, decoded."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_ready_status_stopping_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready()
    notifier.status("streaming 2 sessions\nsecond line")
    notifier.notify(ERRNO="5", BUSERROR="x")
    notifier.stopping()
    notifier.close()
    assert received(sock) == [
        "READY=1\n",
        "STATUS=streaming 2 sessions second line\n",
        "ERRNO=5\nBUSERROR=x\n",
        "STOPPING=1\n",
    ]
    assert not notifier.enabled


def test_reloading_carries_the_monotonic_clock(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = received(sock)
    match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)\n", message)
    assert match, message
    assert before <= int(match[1]) <= after


def test_abstract_socket_name() -> None:
    name = f"caired-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        notifier.close()
        assert received(sock) == ["READY=1\n"]


def test_status_is_sent_only_when_it_changes(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    for text in ["idle", "idle", "idle\n", "busy", "idle"]:
        notifier.status(text)
    assert received(sock) == ["STATUS=idle\n", "STATUS=busy\n", "STATUS=idle\n"]


def test_outside_systemd_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    with capture_logs() as logs:
        notifier.ready()
        notifier.status("x")
        notifier.reloading()
        notifier.watchdog()
        notifier.notify(FOO="bar")
        notifier.stopping()
        notifier.close()
    assert logs == []


def test_an_address_family_it_cannot_speak_disables_it() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert [(entry["event"], entry["notify_socket"]) for entry in logs] == [
        ("notify_socket_unsupported", "vsock:2:1234")
    ]
    notifier.ready()


def test_a_vanished_socket_warns_once_and_never_raises(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    with capture_logs() as logs:
        notifier.ready()
        notifier.status("one")
        notifier.watchdog()
    assert [entry["event"] for entry in logs] == ["sd_notify_failed"]
    assert logs[0]["log_level"] == "warning"


def test_failed_status_is_sent_again_once_the_socket_is_back(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    with capture_logs():
        notifier.status("idle")  # nobody listens yet
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        notifier.status("idle")
        assert received(sock) == ["STATUS=idle\n"]


def test_watchdog_interval_is_half_of_watchdog_usec(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval == 15.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval is None


async def test_watchdog_pings_at_half_the_period(
    listener: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    sock, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000000"})
    tsock = trio.socket.from_stdlib_socket(sock.dup())
    pings: list[tuple[float, bytes]] = []
    start = trio.current_time()

    async def receive() -> None:
        while True:
            data = await tsock.recv(4096)
            pings.append((trio.current_time() - start, data))

    with tsock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await nursery.start(serve_watchdog, notifier)
            await trio.sleep(35)
            nursery.cancel_scope.cancel()
    assert pings == [(0.0, b"WATCHDOG=1\n"), (10.0, b"WATCHDOG=1\n"), (20.0, b"WATCHDOG=1\n"), (30.0, b"WATCHDOG=1\n")]


async def test_watchdog_of_another_pid_is_not_served(
    listener: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    sock, path = listener
    notifier = Notifier.from_env(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    )
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_watchdog, notifier)
    assert trio.current_time() == start  # returned at once
    assert received(sock) == []


async def test_serve_watchdog_returns_at_once_outside_systemd(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_watchdog, Notifier.from_env({}))
    assert trio.current_time() == start


# --- the unit file --------------------------------------------------------------------

needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every 'Key=value' of the unit, in order; keys may repeat."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def runnable_copy(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at a binary that exists on this machine."""
    text = UNIT.read_text()
    shipped = "ExecStart=/opt/caired/bin/caired "
    assert text.count(shipped) == 1
    true = shutil.which("true")
    assert true is not None
    copy = tmp_path / "caired.service"
    copy.write_text(text.replace(shipped, f"ExecStart={true} "))
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, env={**os.environ, "SYSTEMD_COLORS": "0"}
    )


def test_unit_runs_the_daemon_as_a_notify_service_with_a_watchdog() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["ExecStart"] == ["/opt/caired/bin/caired run --config /etc/caired/caired.toml"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["WatchdogSec"] == ["30s"]
    assert settings["User"] == ["caired"]
    assert settings["Group"] == ["caired"]
    assert settings["CapabilityBoundingSet"] == [""]
    # The spool is made by install -d (its group is the droppers'), and the sandbox leaves it
    # writable. Not a StateDirectory: systemd chowns one back to User:Group, recursively, at
    # every start whose top folder has another group, which would undo the droppers' model.
    assert settings["ReadWritePaths"] == ["/var/lib/caired"]
    assert "StateDirectory" not in settings
    assert settings["RequiresMountsFor"] == ["/var/lib/caired"]
    assert settings["LogsDirectory"] == ["caired"]  # /var/log/caired, made by systemd
    assert settings["LogsDirectoryMode"] == ["0750"]  # caired:caired: no dropper reads the log
    assert settings["LoadCredential"] == ["api_key:/etc/caired/api_key"]
    assert "copytruncate" not in UNIT.read_text()


def test_the_unit_paths_are_the_sample_configs() -> None:
    cfg = Config.load(path=SAMPLE, env={})
    settings = unit_settings(UNIT.read_text())
    assert cfg.spool.dir in settings["ReadWritePaths"]
    assert Path(cfg.log.file).parent == Path("/var/log") / settings["LogsDirectory"][0]


def sections(text: str) -> dict[str, dict[str, list[str]]]:
    """The unit's settings per [Section]."""
    found: dict[str, dict[str, list[str]]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            found.setdefault(current, {}).setdefault(key, []).append(value)
    return found


def seconds(value: str) -> float:
    """A systemd time span as used in the unit: '5s', '15min', '1h', or plain seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h)?", value.strip())
    assert match, value
    return float(match[1]) * {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, None: 1}[match[2]]


def start_times(crash_after: list[float], *, restart_sec: float, interval: float, burst: int) -> list[float]:
    """When systemd starts a unit whose n-th run dies ``crash_after[n]`` seconds after it started
    (Restart=on-failure, RestartSec=), under StartLimitIntervalSec=/StartLimitBurst=: the start
    rate limit counts starts in a window opened by the first, and refuses the one past the burst,
    leaving the unit failed. The list ends with the last start made."""
    starts: list[float] = []
    window_start, in_window = 0.0, 0
    now = 0.0
    for run in crash_after:
        if now - window_start > interval or not starts:
            window_start, in_window = now, 0
        if in_window >= burst:
            return starts  # start-limit-hit: the unit stays failed, shown by systemctl status
        in_window += 1
        starts.append(now)
        now += run + restart_sec
    return starts


def test_a_crash_loop_ends_in_the_failed_state() -> None:
    unit = sections(UNIT.read_text())
    # In [Unit]: in [Service] systemd would ignore them (with a warning).
    assert "StartLimitIntervalSec" not in unit["Service"] and "StartLimitBurst" not in unit["Service"]
    interval = seconds(unit["Unit"]["StartLimitIntervalSec"][0])
    burst = int(unit["Unit"]["StartLimitBurst"][0])
    restart_sec = seconds(unit["Service"]["RestartSec"][0])
    assert unit["Service"]["Restart"] == ["on-failure"]
    limits = {"restart_sec": restart_sec, "interval": interval, "burst": burst}

    # Dying at start (a broken install, a native crash on import): a few restarts, then failed.
    starts = start_times([1.0] * 1000, **limits)
    assert len(starts) == burst and starts[-1] < 2 * 60

    # A folder that kills the daemon is quarantined after [spool] max_crashes (3) deaths: three
    # such folders one after another take 9 deaths, and the 10th start is the one that lives.
    max_crashes = 3
    poison = [1.0] * (3 * max_crashes) + [float("inf")]
    assert len(start_times(poison, **limits)) == len(poison)

    # A crash now and then (once an hour) never reaches the limit.
    assert len(start_times([3600.0] * 50, **limits)) == 50


def test_a_configuration_error_is_not_restarted() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["RestartPreventExitStatus"] == [str(int(ExitCode.CONFIG))]


def size_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", value)
    assert match, value
    return int(match[1]) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match[2]]


@attrs.define
class Footprint:
    rss: int = 0  # peak resident bytes (VmHWM)
    threads: int = 0
    fds: int = 0

    def sample(self, pid: int) -> None:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        self.rss = max(self.rss, int(status["VmHWM"].split()[0]) * 1024)
        self.threads = max(self.threads, int(status["Threads"]))
        self.fds = max(self.fds, len(os.listdir(f"/proc/{pid}/fd")))


@pytest.mark.slow
async def test_the_resource_limits_leave_four_times_what_the_daemon_uses(
    backend: BackendFactory, tmp_path: Path
) -> None:
    """'caired run' as the unit runs it (its Environment=), streaming 640x480 folders two at a
    time: its peak memory, threads and descriptors stay under a quarter of the unit's limits."""
    settings = unit_settings(UNIT.read_text())
    assert settings["MemorySwapMax"] == ["0"]  # a runaway ends at the limit instead of thrashing
    state = await backend()
    spool = tmp_path / "spool"
    env = cli_env(
        BACKEND_WS_BASE=f"ws://127.0.0.1:{state.port}/ws/",
        CAIRED_SPOOL_DIR=str(spool),
        CAIRED_SPOOL_MAX_SESSIONS="2",
        CAIRED_LOG_FORMAT="json",
        **dict(value.split("=", 1) for value in settings["Environment"]),
    )
    folders = []
    for index in range(4):
        folders.append(tmp_path / f"rec-{index}")
        write_frames(folders[-1], 45, size=(640, 480), seed=index)
    used = Footprint()
    with (tmp_path / "out").open("wb") as out:
        proc = await trio.lowlevel.open_process([sys.executable, "-m", "caired", "run"], env=env, stdout=out,
                                                stderr=subprocess.STDOUT)
    try:
        with trio.fail_after(120):
            while not (spool / "incoming").is_dir():
                assert proc.returncode is None, (tmp_path / "out").read_text()
                await trio.sleep(0.05)
            for folder in folders:
                folder.rename(spool / "incoming" / folder.name)
            while len(os.listdir(spool / "done")) < len(folders):
                assert proc.returncode is None, (tmp_path / "out").read_text()
                assert not os.listdir(spool / "failed")
                used.sample(proc.pid)
                await trio.sleep(0.02)
        used.sample(proc.pid)
    finally:
        proc.terminate()
        with trio.move_on_after(20, shield=True):
            await proc.wait()
    assert used.rss * 4 <= size_bytes(settings["MemoryMax"][0]), used
    assert used.threads * 4 <= int(settings["TasksMax"][0]), used
    # Threads may grow to trio's pool of 40 and one encoder more than the CPUs, all at once.
    assert used.threads + 40 + encode_workers(paced=False) <= int(settings["TasksMax"][0]), used
    assert used.fds * 4 <= int(settings["LimitNOFILE"][0]), used


@needs_analyze
def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    result = analyze("verify", str(runnable_copy(tmp_path)))
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "caired" in line]
    assert complaints == []
    assert result.returncode == 0


@needs_analyze
def test_shipped_unit_only_lacks_the_installed_binary() -> None:
    result = analyze("verify", str(UNIT))
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "caired" in line]
    if os.access("/opt/caired/bin/caired", os.X_OK):  # installed here: nothing to complain about
        assert complaints == []
    else:
        assert complaints == [
            "caired.service: Command /opt/caired/bin/caired is not executable: No such file or directory"
        ]


@needs_analyze
def test_unit_sandbox_is_rated_ok(tmp_path: Path) -> None:
    result = analyze("security", "--offline=yes", str(runnable_copy(tmp_path)))
    match = re.search(r"Overall exposure level for caired\.service: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= 2.5, result.stdout
    assert match[2] == "OK"
