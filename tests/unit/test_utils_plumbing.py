"""Process plumbing with one home each: atomic writes, free ports, usable CPUs, stopping a process group."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from sar_scale.utils.atomic import TMP_MARK, atomic_path, atomic_write, atomic_write_json
from sar_scale.utils.cpus import usable_cpus
from sar_scale.utils.net import free_port
from sar_scale.utils.procs import stop_process_group


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    p = tmp_path / "d" / "f.json"
    atomic_write_json(p, {"a": 1})
    assert p.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert p.read_text().startswith('{\n  "a": 1') and os.listdir(p.parent) == ["f.json"]
    atomic_write(p, b"new", sync_dir=True)
    assert p.read_bytes() == b"new" and not [n for n in os.listdir(p.parent) if TMP_MARK in n]


def test_free_port_and_usable_cpus():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)


def test_stop_process_group_terms_then_kills_the_whole_group():
    code = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print(os.getpid(), flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    t0 = time.monotonic()
    assert stop_process_group(proc, grace_s=0.5) is True  # SIGTERM ignored -> SIGKILL
    assert time.monotonic() - t0 < 15 and proc.poll() is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # the grandchild went with the group
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a member of the group survived")
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    assert stop_process_group(polite, grace_s=10) is False and polite.returncode is not None
    assert stop_process_group(polite) is False  # already gone: nothing to do
