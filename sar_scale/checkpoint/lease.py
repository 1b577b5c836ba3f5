"""One writer per run directory: a lease with a heartbeat, on local disk and on the checkpoint mirror.

A training job takes ``RUN_DIR/lease.json`` before it writes anything (and ``lease.json`` under
``checkpoint.mirror_url`` when set, so two machines sharing one S3 mirror exclude each other too).
A second job on a held run directory fails with :class:`RunDirBusy`, naming the holder (host, pid,
since, last heartbeat). A lease is stale - and is taken over, with a log line - when its heartbeat
is older than ``stale_s``, or at once when its holder was on this host and its process is gone.
The holder rewrites the heartbeat from a daemon thread; if it finds its lease taken over (it was
presumed dead), :meth:`RunLease.check` raises before the next checkpoint write.

Local creation is atomic (``O_CREAT | O_EXCL``); a takeover, and the S3 lease (S3 has no portable
create-if-absent across the stores we support), are write-then-read-back: of two racing
takers, the one whose token is not read back loses and fails.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sar_scale.config import ConfigError
from sar_scale.utils.atomic import atomic_write

logger = logging.getLogger(__name__)

LEASE = "lease.json"


class RunDirBusy(ConfigError):
    """Another live job holds this run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie (killed, not yet reaped) is gone
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


class RunLease:
    """The lease of one run directory (and optionally its checkpoint mirror) held by this process."""

    def __init__(self, run_dir: str | Path, mirror=None, stale_s: float = 60.0, beat_s: float | None = None):
        self.path = Path(run_dir) / LEASE
        self.mirror = mirror  # a sar_scale.data.storage.Storage, a callable making one, or None
        self.stale_s = float(stale_s)
        self.beat_s = beat_s if beat_s is not None else max(0.5, min(10.0, self.stale_s / 4))
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                   "token": uuid.uuid4().hex, "run_dir": str(Path(run_dir).resolve())}
        self.lost: dict[str, Any] | None = None
        self._mirror_held = False
        self._mirror_error: BaseException | None = None
        self._mirror_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ holder records
    def _record(self) -> bytes:
        return json.dumps({**self.me, "heartbeat": time.time()}).encode()

    def stale(self, holder: dict[str, Any], now: float | None = None) -> str:
        """Why ``holder`` no longer holds the lease ("" = it does)."""
        now = time.time() if now is None else now
        hb = float(holder.get("heartbeat", 0))
        if now - hb > self.stale_s:
            return f"its heartbeat is {now - hb:.0f}s old (> checkpoint.lease_stale_s={self.stale_s:g})"
        if holder.get("host") == self.me["host"] and not _pid_alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} on this host is gone"
        return ""

    def _busy(self, where: str, holder: dict[str, Any]) -> RunDirBusy:
        return RunDirBusy(
            f"{where} is held by another training job: host {holder.get('host')}, pid {holder.get('pid')}, "
            f"since {_fmt_time(float(holder.get('since', 0)))}, last heartbeat "
            f"{time.time() - float(holder.get('heartbeat', 0)):.0f}s ago. One job writes a run directory: "
            "stop that job, or use another run_dir (a lease whose heartbeat is older than "
            f"checkpoint.lease_stale_s={self.stale_s:g}s is taken over)")

    # ------------------------------------------------------------------ local disk
    def _read_local(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # half-written by a holder that died mid-write: judge it by the file's age
            try:
                return {"host": "?", "pid": -1, "since": 0, "heartbeat": self.path.stat().st_mtime}
            except FileNotFoundError:
                return None

    def _write_local(self) -> None:
        atomic_write(self.path, self._record(), fsync=False)  # a heartbeat: no fsync per beat

    def _acquire_local(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._read_local()
            if holder is not None:
                why = self.stale(holder)
                if not why:
                    raise self._busy(str(self.path.parent), holder) from None
                logger.warning("taking over the stale lease of %s (host %s, pid %s, since %s): %s",
                               self.path.parent, holder.get("host"), holder.get("pid"),
                               _fmt_time(float(holder.get("since", 0))), why)
            self._write_local()
            time.sleep(0.05)  # a racing taker's replace lands now; the read-back decides
            got = self._read_local() or {}
            if got.get("token") != self.me["token"]:
                raise self._busy(str(self.path.parent), got) from None
            return
        with os.fdopen(fd, "wb") as f:
            f.write(self._record())

    # ------------------------------------------------------------------ mirror (S3 or a dir)
    def _read_mirror(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.mirror.get_bytes(LEASE))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"host": "?", "pid": -1, "since": 0, "heartbeat": 0}

    def _acquire_mirror(self) -> None:
        holder = self._read_mirror()
        if holder is not None and holder.get("token") != self.me["token"]:
            why = self.stale(holder)
            if not why:
                raise self._busy(self.mirror.url(), holder)
            logger.warning("taking over the stale lease of %s (host %s, pid %s): %s", self.mirror.url(),
                           holder.get("host"), holder.get("pid"), why)
        self.mirror.put_bytes(self._record(), LEASE)
        got = self._read_mirror() or {}
        if got.get("token") != self.me["token"]:
            raise self._busy(self.mirror.url(), got)

    # ------------------------------------------------------------------ life cycle
    def acquire(self, mirror_in_background: bool = False) -> RunLease:
        """Take the lease (raises :class:`RunDirBusy` naming the holder) and start the heartbeat.

        ``mirror_in_background``: take the mirror's lease in a thread (object-store round trips with
        retries can take seconds while other ranks wait in a collective); :meth:`check` waits for it
        and raises if it was refused - call it before the first write to the mirror."""
        self._acquire_local()
        if self.mirror is not None and mirror_in_background:
            def take() -> None:
                try:
                    if callable(self.mirror):  # opening an object store client is slow too
                        self.mirror = self.mirror()
                    self._acquire_mirror()
                    self._mirror_held = True
                except BaseException as e:  # noqa: BLE001 - reported by check()
                    self._mirror_error = e

            self._mirror_thread = threading.Thread(target=take, name="run-lease-mirror", daemon=True)
            self._mirror_thread.start()
        elif self.mirror is not None:
            try:
                if callable(self.mirror):
                    self.mirror = self.mirror()
                self._acquire_mirror()
                self._mirror_held = True
            except BaseException:
                self._release_local()
                raise
        self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                local = self._read_local() or {}
                if local.get("token") not in (None, self.me["token"]):
                    self.lost = local
                    logger.error("the lease of %s was taken over by host %s pid %s", self.path.parent,
                                 local.get("host"), local.get("pid"))
                    return
                self._write_local()
                if self.mirror is not None and self._mirror_held:
                    self.mirror.put_bytes(self._record(), LEASE)
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; staleness has slack
                logger.warning("lease heartbeat failed: %s", e)

    def check(self) -> None:
        """Raise if the mirror's lease was refused, or another job took this run directory over (this
        job was presumed dead)."""
        if self._mirror_thread is not None:
            self._mirror_thread.join()
            if isinstance(self._mirror_error, RunDirBusy):
                raise RunDirBusy(str(self._mirror_error))
            if self._mirror_error is not None:
                raise RunDirBusy(f"{self.mirror.url()}: could not take the lease of the checkpoint mirror: "
                                 f"{self._mirror_error}")
        if self.lost is not None:
            raise RunDirBusy(f"{self.path.parent}: this job's lease was taken over by host "
                             f"{self.lost.get('host')} pid {self.lost.get('pid')}; stopping before writing "
                             "more checkpoints")

    def _release_local(self) -> None:
        got = self._read_local() or {}
        if got.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._release_local()
            if self._mirror_thread is not None:
                self._mirror_thread.join(timeout=30)
            if self._mirror_held and (self._read_mirror() or {}).get("token") == self.me["token"]:
                self.mirror.delete(LEASE)
        except Exception as e:  # noqa: BLE001 - a stale lease is taken over by the next job anyway
            logger.warning("could not release the lease of %s: %s", self.path.parent, e)


__all__ = ["LEASE", "RunDirBusy", "RunLease"]
