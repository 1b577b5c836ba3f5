"""Crash-safe DeepSpeed checkpoints: commit marker with checksums, keep-last-K, verified resume, mirror.

Layout under the checkpoint root::

    step00000040/                  one checkpoint (tag = global optimizer step)
        mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's files (every rank writes its own)
        train_state.json           step, stage, data position, resolved config, MLflow run id (rank 0)
        rng_rank{r}.json           each rank's RNG states (JSON, no pickle)
        ema.safetensors            optional EMA weights, full shapes (rank 0)
        COMPLETE.json              written LAST by rank 0, after a barrier: sha256 + size of every file
    latest                         tag of the newest complete checkpoint, written after COMPLETE.json

A checkpoint without ``COMPLETE.json`` is a save that was interrupted and is never resumed from.
``--resume auto`` walks complete checkpoints newest first, verifies every checksum, and falls back
to the previous one with a log line naming the bad file. DeepSpeed's own ``.pt`` files are loaded by
DeepSpeed with ``torch.load(weights_only=False)`` (its format needs it); we only let that happen after
the checksums match, i.e. on files this run wrote. Everything of ours is JSON or safetensors.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sar_scale.distributed import comm
from sar_scale.utils.atomic import atomic_write

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE.json"
TRAIN_STATE = "train_state.json"
LATEST = "latest"
EMA_FILE = "ema.safetensors"
TAG_RE = re.compile(r"^step(\d{8,})$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def sha256_file(path: str | Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text, sync_dir=True)  # the rename is durable before anyone trusts it


def _files_of(ckpt_dir: Path) -> list[str]:
    """Relative paths of every regular file in a checkpoint except the marker itself, sorted."""
    out = []
    for dirpath, _, files in os.walk(ckpt_dir):
        for fn in files:
            rel = os.path.relpath(os.path.join(dirpath, fn), ckpt_dir)
            if rel != COMPLETE and ".tmp-" not in fn:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def _hash_share(ckpt_dir: Path, files: list[str], rank: int, world: int) -> dict[str, list]:
    """This rank's share of the files (round robin): {rel: [sha256, size]} (None if missing)."""
    out: dict[str, list] = {}
    for i, rel in enumerate(files):
        if i % world != rank:
            continue
        p = ckpt_dir / rel
        try:
            out[rel] = [sha256_file(p), p.stat().st_size]
        except FileNotFoundError:
            out[rel] = [None, None]
    return out


def distributed_hashes(ckpt_dir: Path, files: list[str]) -> dict[str, list]:
    """Hash ``files`` with every rank doing a share (checkpoints can be tens of GB); all ranks get all."""
    share = _hash_share(ckpt_dir, files, comm.rank(), comm.world_size())
    merged: dict[str, list] = {}
    for part in comm.all_gather_object(share):
        merged.update(part)
    return merged


# ----------------------------------------------------------------------------- RNG states as JSON


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU + CUDA) RNG states, JSON-serialisable (no pickle)."""
    import numpy as np
    import torch

    py = random.getstate()
    npst = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], base64.b64encode(npst[1].astype("<u4").tobytes()).decode(), int(npst[2]),
                  int(npst[3]), float(npst[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    v, st, g = state["python"]
    random.setstate((v, tuple(st), g))
    name, keys, pos, has_g, cached = state["numpy"]
    np.random.set_state((name, np.frombuffer(base64.b64decode(keys), dtype="<u4").copy(), pos, has_g, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


# ----------------------------------------------------------------------------- listing / verifying


@dataclass(frozen=True)
class CheckpointInfo:
    tag: str
    step: int
    path: Path
    complete: bool


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """Every ``stepNNNNNNNN`` folder under ``root``, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        step = step_of(p.name)
        if step is not None and p.is_dir():
            out.append(CheckpointInfo(p.name, step, p, (p / COMPLETE).is_file()))
    return sorted(out, key=lambda c: c.step)


def read_marker(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / COMPLETE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint (no {COMPLETE}; the save was interrupted)")
    try:
        marker = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable commit marker: {e}") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise CheckpointError(f"{path}: commit marker has no 'files' table")
    return marker


def verify_checkpoint(ckpt_dir: str | Path, hashes: dict[str, list] | None = None) -> None:
    """Raise :class:`CheckpointError` naming the first missing/truncated/corrupted file.

    ``hashes``: precomputed {rel: [sha256, size]} (from :func:`distributed_hashes`); else hashed here.
    """
    ckpt_dir = Path(ckpt_dir)
    marker = read_marker(ckpt_dir)
    files = marker["files"]
    if hashes is None:
        hashes = _hash_share(ckpt_dir, sorted(files), 0, 1)
    for rel in sorted(files):
        want = files[rel]
        got_sha, got_size = hashes.get(rel, [None, None])
        if got_sha is None:
            raise CheckpointError(f"{ckpt_dir / rel}: missing (listed in {COMPLETE})")
        if got_size != want["bytes"]:
            raise CheckpointError(f"{ckpt_dir / rel}: size {got_size} != {want['bytes']} recorded at save "
                                  "(truncated or replaced)")
        if got_sha != want["sha256"]:
            raise CheckpointError(f"{ckpt_dir / rel}: sha256 mismatch (corrupted since it was saved)")


def read_train_state(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / TRAIN_STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None
    for field in ("global_step", "stage", "data"):
        if field not in state:
            raise CheckpointError(f"{path}: missing field '{field}'")
    return state


def read_rng(ckpt_dir: str | Path, rank: int) -> dict[str, Any] | None:
    path = Path(ckpt_dir) / f"rng_rank{rank}.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Save/prune/resume checkpoints for one run. All methods that touch a checkpoint are collective."""

    def __init__(self, root: str | Path, keep_last: int = 3, keep_stage_ends: bool = True,
                 mirror_url: str | None = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_stage_ends = keep_stage_ends
        self.mirror_url = mirror_url
        self._mirror = None
        self._uploader: cf.ThreadPoolExecutor | None = None
        self._pending: dict[str, cf.Future] = {}

    # ------------------------------------------------------------------ mirror
    @property
    def mirror(self):
        if self.mirror_url and self._mirror is None:
            from sar_scale.data.storage import open_storage

            self._mirror = open_storage(self.mirror_url)
        return self._mirror

    def _upload(self, tag: str, files: list[str]) -> None:
        """Upload a complete checkpoint: data files, then the marker, then ``latest`` (readers trust order)."""
        m = self.mirror
        src = self.root / tag
        t0 = time.time()
        for rel in files:
            m.put_file(src / rel, f"{tag}/{rel}")
        m.put_file(src / COMPLETE, f"{tag}/{COMPLETE}")
        m.put_bytes(tag.encode(), LATEST)
        logger.info("mirrored checkpoint %s to %s in %.1fs", tag, m.url(tag), time.time() - t0)

    def wait_uploads(self) -> None:
        """Block until queued mirror uploads finish (re-raises an upload error)."""
        for tag, fut in list(self._pending.items()):
            fut.result()
            self._pending.pop(tag, None)

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, train_state: dict[str, Any],
             ema_state: dict[str, Any] | None = None) -> Path:
        """Collective save of checkpoint ``step`` (call on every rank); returns its folder.

        Order: DeepSpeed files + our JSON (all ranks) -> barrier -> checksums (shared among ranks)
        -> COMPLETE.json (rank 0) -> ``latest`` -> prune -> mirror upload (rank 0, background).
        """
        from sar_scale.distributed import faults

        tag = tag_for(step)
        path = self.root / tag
        rank = comm.rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a leftover from a crashed save or a retired timeline: never mix files
                self._wait_pending(tag)
                shutil.rmtree(path)
        comm.barrier()
        t0 = time.time()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        (path / f"rng_rank{rank}.json").write_text(json.dumps(rng_state()))
        if rank == 0:
            state = dict(train_state, tag=tag, format_version=FORMAT_VERSION)
            (path / TRAIN_STATE).write_text(json.dumps(state, indent=1, sort_keys=True, default=str))
            if ema_state is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in ema_state.items()}, str(path / EMA_FILE))
        faults.maybe_fire("ckpt_files_written", step=step)
        comm.barrier()
        files = comm.broadcast_object(_files_of(path) if rank == 0 else None)
        hashes = distributed_hashes(path, files)
        if rank == 0:
            missing = [f for f, (sha, _) in hashes.items() if sha is None]
            if missing:
                raise CheckpointError(f"{path}: files vanished during save: {missing[:5]}")
            marker = {"tag": tag, "global_step": step, "world_size": comm.world_size(),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "format_version": FORMAT_VERSION,
                      "files": {f: {"sha256": h[0], "bytes": h[1]} for f, h in sorted(hashes.items())}}
            _atomic_write_text(path / COMPLETE, json.dumps(marker, indent=1))
            _atomic_write_text(self.root / LATEST, tag)
            self._prune()
            if self.mirror_url:
                if self._uploader is None:
                    self._uploader = cf.ThreadPoolExecutor(1, thread_name_prefix="ckpt-upload")
                self._pending[tag] = self._uploader.submit(self._upload, tag, files)
        comm.barrier()
        if rank == 0:
            size = sum(h[1] for h in hashes.values())
            logger.info("saved checkpoint %s (%d files, %.1f MB) in %.1fs", path, len(files), size / 1e6,
                        time.time() - t0)
        return path

    def _wait_pending(self, tag: str) -> None:
        fut = self._pending.pop(tag, None)
        if fut is not None:
            fut.result()

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints (+ stage ends); drop older incomplete ones."""
        ckpts = list_checkpoints(self.root)
        complete = [c for c in ckpts if c.complete]
        keep = {c.tag for c in complete[-self.keep_last:]}
        newest = complete[-1].step if complete else -1
        for c in ckpts:
            if c.tag in keep:
                continue
            if c.complete and self.keep_stage_ends:
                try:
                    if read_train_state(c.path).get("stage_complete"):
                        continue
                except CheckpointError:
                    pass
            if not c.complete and c.step > newest:
                continue  # could be a save in flight of a newer step: never touch
            self._wait_pending(c.tag)
            shutil.rmtree(c.path, ignore_errors=True)
            shutil.rmtree(self.root / "universal" / c.tag, ignore_errors=True)  # its resharding copy, if any
            logger.info("pruned checkpoint %s", c.tag)
            if self.mirror_url:
                try:
                    for key in self.mirror.list(f"{c.tag}/"):
                        self.mirror.delete(key)
                except Exception as e:  # noqa: BLE001 - a failed remote prune must not stop training
                    logger.warning("could not prune mirrored %s: %s", c.tag, e)

    # ------------------------------------------------------------------ resume
    def find_resume(self, resume: str) -> Path | None:
        """Collective: the checkpoint folder to resume from (same on every rank), or None.

        ``resume``: ``none``; ``auto`` (newest complete checkpoint whose checksums verify, else the
        previous one, else the mirror's newest); or a checkpoint folder path.
        """
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if not path.is_dir():
                raise CheckpointError(f"--resume {resume}: not a checkpoint folder")
            self._verify_collective(path)  # an explicit choice that is bad is an error, no fallback
            return path
        candidates = [c for c in reversed(list_checkpoints(self.root))]
        for c in candidates:
            if not c.complete:
                if comm.rank() == 0:
                    logger.warning("skipping %s: incomplete (no %s, its save was interrupted)", c.path, COMPLETE)
                continue
            try:
                self._verify_collective(c.path)
                return c.path
            except CheckpointError as e:
                if comm.rank() == 0:
                    logger.error("checkpoint %s is bad, falling back to an older one: %s", c.tag, e)
        if self.mirror_url:
            got = self._download_newest()
            if got is not None:
                return got
        return None

    def _verify_collective(self, path: Path) -> None:
        ok = None
        try:
            marker = read_marker(path)
            ok = ""
        except CheckpointError as e:
            ok = str(e)
        ok = comm.broadcast_object(ok)
        if ok:
            raise CheckpointError(ok)
        hashes = distributed_hashes(path, sorted(marker["files"]))
        err = ""
        if comm.rank() == 0:
            try:
                verify_checkpoint(path, hashes)
                read_train_state(path)
            except CheckpointError as e:
                err = str(e)
        err = comm.broadcast_object(err)
        if err:
            raise CheckpointError(err)

    def _download_newest(self) -> Path | None:
        """Rank 0 downloads the mirror's newest verifiable checkpoint into the root (shared FS)."""
        chosen = ""
        if comm.rank() == 0:
            m = self.mirror
            tags = sorted({k.split("/", 1)[0] for k in m.list("") if k.endswith("/" + COMPLETE)},
                          key=lambda t: step_of(t) or -1, reverse=True)
            for tag in tags:
                if step_of(tag) is None:
                    continue
                dest = self.root / tag
                tmp = self.root / f".download-{tag}"
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    marker = json.loads(m.get_bytes(f"{tag}/{COMPLETE}"))
                    for rel in marker["files"]:
                        m.get_file(f"{tag}/{rel}", tmp / rel)
                    (tmp / COMPLETE).write_text(json.dumps(marker))
                    verify_checkpoint(tmp)
                except Exception as e:  # noqa: BLE001 - try the next older one, say why
                    logger.error("mirrored checkpoint %s is unusable: %s", m.url(tag), e)
                    shutil.rmtree(tmp, ignore_errors=True)
                    continue
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)
                logger.info("downloaded checkpoint %s from %s", tag, m.url(tag))
                chosen = str(dest)
                break
        chosen = comm.broadcast_object(chosen)
        return Path(chosen) if chosen else None

    # ------------------------------------------------------------------ resharding
    def universal(self, ckpt: Path) -> Path:
        """Collective: a DeepSpeed universal checkpoint of (verified) ``ckpt`` for loading on another world
        size; returns the folder to pass as ``load_dir`` (the tag stays ``ckpt.name``).

        Rank 0 converts once with DeepSpeed's ``ds_to_universal`` into ``ROOT/universal/TAG`` (reused by a
        later resume: a ``CONVERTED`` marker is written last), inside :func:`restricted_unpickling` so a
        tampered checkpoint cannot run code while being converted. In-process (one worker): conversion
        is I/O bound and a process pool would escape the restricted unpickler.
        """
        out_root = self.root / "universal"
        dest = out_root / ckpt.name
        err = ""
        if comm.rank() == 0 and not (dest / "CONVERTED").is_file():
            import argparse
            import contextlib
            import io

            from deepspeed.checkpoint import ds_to_universal

            from sar_scale.checkpoint.safe_load import restricted_unpickling

            shutil.rmtree(dest, ignore_errors=True)
            t0 = time.time()
            args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(dest), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True)
            out = io.StringIO()
            try:
                with restricted_unpickling(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    ds_to_universal.main(args)
                (dest / "CONVERTED").write_text(json.dumps({"source": str(ckpt), "time": time.time()}))
                logger.info("converted %s to a universal checkpoint %s in %.1fs", ckpt, dest, time.time() - t0)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                err = (f"{ckpt}: converting to a DeepSpeed universal checkpoint (to reshard the optimizer "
                       f"state for another world size) failed: {type(e).__name__}: {e}; "
                       f"converter output: {out.getvalue()[-1500:]}")
        err = comm.broadcast_object(err)
        if err:
            raise CheckpointError(err)
        return out_root

    def retire_after(self, step: int) -> None:
        """Rank 0: move checkpoints newer than ``step`` aside (``*.retired-N``) so a later ``--resume auto``
        never jumps back onto a timeline this run has abandoned. Nothing is deleted."""
        if comm.rank() == 0:
            for c in list_checkpoints(self.root):
                if c.step > step:
                    n = 0
                    while (dest := c.path.with_name(f"{c.tag}.retired-{n}")).exists():
                        n += 1
                    os.replace(c.path, dest)
                    logger.warning("moved %s aside to %s (newer than the resume point)", c.path, dest.name)
            latest = tag_for(step)
            if (self.root / latest).is_dir():
                _atomic_write_text(self.root / LATEST, latest)
        comm.barrier()

    def close(self) -> None:
        if self._uploader is not None:
            self.wait_uploads()
            self._uploader.shutdown(wait=True)
            self._uploader = None
