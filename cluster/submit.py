"""Idempotent submission: the job id is the key, checked in the registry and on the backend.

Order of checks under the id's lock: (1) the registry has the id with a backend id -> that job,
nothing new starts; (2) the registry has the id but no backend id (we crashed between submit and
record) or no record at all -> ask the backend for a job with this name (squeue --name, Ray
submission id, k8s object name) and adopt it; (3) otherwise submit and record. Reusing an id for
a *different* submission is an error, not a silent no-op.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field

from cluster.backends import Backend, get_backend
from cluster.errors import JobConflictError
from cluster.registry import JobRecord, JobRegistry
from cluster.spec import JobSpec

logger = logging.getLogger(__name__)


@dataclass
class SubmitResult:
    record: JobRecord
    created: bool
    members: list[SubmitResult] = field(default_factory=list)


def _record(spec: JobSpec, backend_id: str | None, info: dict) -> JobRecord:
    return JobRecord(job_id=spec.job_id, backend=spec.backend, backend_id=backend_id,
                     fingerprint=spec.fingerprint(), command=list(spec.command),
                     spec=spec.model_dump(mode="json"), log_path=info.get("log"), info=info)


def submit_job(spec: JobSpec, registry: JobRegistry, backend: Backend | None = None,
               after: list[str] | None = None, environ: dict[str, str] | None = None) -> SubmitResult:
    """Submit ``spec`` unless a job with its id exists (then return that one, ``created=False``)."""
    backend = backend or get_backend(spec.backend)
    environ = dict(os.environ if environ is None else environ)
    job_dir = registry.job_dir(spec.job_id)
    with registry.lock(spec.job_id):
        rec = registry.get(spec.job_id)
        if rec is not None and rec.fingerprint != spec.fingerprint():
            raise JobConflictError(
                f"job id {spec.job_id!r} was already used for a different submission "
                f"({rec.backend}: {' '.join(rec.command)}); ids are idempotency keys - choose a new --job-id")
        if rec is not None and rec.backend_id:
            logger.info("job %s already submitted (%s %s): not resubmitting", spec.job_id, rec.backend,
                        rec.backend_id)
            return SubmitResult(rec, created=False)
        backend.check(spec, environ)
        found = backend.find(spec, job_dir)
        if found is not None:
            backend_id, info = found
            info.setdefault("job_dir", str(job_dir))
            rec = _record(spec, backend_id, info)
            registry.put(rec)
            logger.info("job %s found on %s as %s: adopted, not resubmitted", spec.job_id, spec.backend, backend_id)
            return SubmitResult(rec, created=False)
        registry.put(_record(spec, None, {"job_dir": str(job_dir)}))  # "submitting" marker
        backend_id, info = backend.submit(spec, job_dir, after=after)
        info.setdefault("job_dir", str(job_dir))
        rec = _record(spec, backend_id, info)
        registry.put(rec)
        return SubmitResult(rec, created=True)


def chain_fingerprint(specs: list[JobSpec]) -> str:
    return hashlib.sha256("|".join(s.fingerprint() for s in specs).encode()).hexdigest()[:16]


def submit_chain(group_id: str, specs: list[JobSpec], registry: JobRegistry, backend: Backend | None = None,
                 environ: dict[str, str] | None = None) -> SubmitResult:
    """Submit ``specs`` in order, each starting only after the previous one succeeded (afterok).

    Resubmitting the same group id re-uses every member already submitted and submits only the
    missing ones (e.g. after a crash half-way through the chain).
    """
    if not specs:
        raise ValueError("a chain needs at least one job")
    backend = backend or get_backend(specs[0].backend)
    fp = chain_fingerprint(specs)
    with registry.lock(group_id):
        grp = registry.get(group_id)
        if grp is not None and grp.fingerprint != fp:
            raise JobConflictError(f"job id {group_id!r} was already used for a different chain; choose a "
                                   f"new --job-id")
        if grp is None:
            grp = JobRecord(job_id=group_id, kind="chain", backend=specs[0].backend, fingerprint=fp,
                            command=list(specs[-1].command), members=[s.job_id for s in specs],
                            info={"job_dir": str(registry.job_dir(group_id))})
            registry.put(grp)
    results: list[SubmitResult] = []
    prev: str | None = None
    for spec in specs:
        r = submit_job(spec, registry, backend, after=[prev] if prev else None, environ=environ)
        results.append(r)
        prev = r.record.backend_id
    return SubmitResult(grp, created=any(r.created for r in results), members=results)
