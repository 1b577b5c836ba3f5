"""Partitioned, deterministic deduplication and shard planning (NeMo Curator-style, on Ray tasks).

Stages, each one Ray task per partition reading and writing staging files (:mod:`pipelines.staging`):

1. ``sid``   (by key range)  same sample key (= same source id) -> keep the earliest input
                             (a sample already in the dataset always wins), ``duplicate_source_id``;
2. ``exact`` (by pixel hash) same decoded pixels -> keep the smallest source id, ``duplicate``;
3. ``near``  (by LSH band)   pHash within ``phash_max_distance``: the 64 bits are cut into t+1 bands,
                             so near pairs share a band value exactly (pigeonhole, no false negatives);
                             each band bucket is compared pairwise -> edges, routed both ways to the
                             key ranges of their two ends (adjacency);
4. ``label`` rounds (by key range) connected components by min-label propagation: every node keeps the
                             best member it has heard of and tells its neighbours when that changes,
                             round after round until no label changes (rounds = the longest shortest
                             path in a component; a task holds its key range's nodes and edges only).
                             Per component the smallest source id stays (or, in an append run, every
                             existing sample stays and all new members go), ``near_duplicate``;
5. ``assign`` (by key range) drop the losers, group survivors by aspect bucket, sort by key, write
                             ``assign/{bucket}/p{p}``; the driver turns the per-bucket counts into shards.

Winners depend on (source id, input order) only - never on task timing or the number of workers.
Rows of the dataset being appended to take part as incumbents ("base" rows from ``hashes.npy``).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations
from typing import Any

import numpy as np

from pipelines.staging import Staging, hash_part, key_part, to_unsigned64

DEDUP_FIELDS = ("key", "sid", "u", "i", "sha", "phash", "base")


def _order(r: dict[str, Any]) -> tuple:
    """Who wins inside a duplicate group: dataset samples first, then the smallest source id, then input order."""
    return (not r["base"], r["sid"], r["u"], r["i"], r["key"])


def _proj(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in DEDUP_FIELDS}


def _drop(r: dict[str, Any], reason: str, winner: dict[str, Any] | None, remove: bool) -> dict[str, Any]:
    detail = ""
    if winner is not None:
        detail = f"of existing sample {winner['key']}" if winner["base"] else f"of {winner['sid']}"
    return {"key": r["key"], "sid": r["sid"], "reason": reason, "detail": detail, "remove": remove}


def bands(max_distance: int, bits: int = 64) -> list[tuple[int, int]]:
    edges = np.linspace(0, bits, max_distance + 2).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _next_stage(stg: Staging, producer: str, rows: list[dict[str, Any]], opts: dict[str, Any], after: str) -> None:
    """Route dedup rows to the next enabled stage after ``after`` ("sid" or "exact")."""
    P = opts["parts"]
    if after == "sid" and opts["exact"]:
        stg.write_parts("exact", producer, rows, lambda r: hash_part(r["sha"], P))
    elif opts["near"]:
        out = []
        for r in rows:
            h = to_unsigned64(r["phash"])
            for b, (lo, hi) in enumerate(bands(opts["max_distance"])):
                out.append({**r, "band": b, "val": (h >> lo) & ((1 << (hi - lo)) - 1)})
        stg.write_parts("near", producer, out, lambda r: hash_part(f"{r['band']}:{r['val']}", P))


def sid_stage(stg: Staging, p: int, opts: dict[str, Any]) -> dict[str, int]:
    """Partition ``p`` of the scan rows (+ dataset incumbents): one winner per sample key."""
    rows = sorted(stg.read_part("scan", p), key=lambda r: (r["key"], *_order(r)))
    winners, drops = [], []
    for r in rows:
        if winners and winners[-1]["key"] == r["key"]:
            drops.append(_drop(r, "duplicate_source_id", None, remove=False))  # the key stays (its winner)
        else:
            winners.append(r)
    stg.write_parts("drop", f"sid-{p:05d}", drops, lambda r: p)
    stg.write_parts("cand", f"s{p:05d}", [r for r in winners if not r["base"]], lambda r: p)
    _next_stage(stg, f"s{p:05d}", [_proj(r) for r in winners], opts, "sid")
    return {"rows": len(rows), "dropped": len(drops)}


def exact_stage(stg: Staging, q: int, opts: dict[str, Any]) -> dict[str, int]:
    """Partition ``q`` by pixel hash: one winner per identical decoded image."""
    rows = sorted(stg.read_part("exact", q), key=lambda r: (r["sha"], *_order(r)))
    winners, drops = [], []
    for r in rows:
        if winners and winners[-1]["sha"] == r["sha"]:
            if not r["base"]:  # two dataset samples with equal pixels both stay (already committed)
                drops.append(_drop(r, "duplicate", winners[-1], remove=True))
        else:
            winners.append(r)
    P = opts["parts"]
    stg.write_parts("drop", f"exact-{q:05d}", drops, lambda r: key_part(r["key"], P))
    _next_stage(stg, f"e{q:05d}", winners, opts, "exact")
    return {"rows": len(rows), "dropped": len(drops)}


def near_stage(stg: Staging, r_: int, opts: dict[str, Any]) -> dict[str, int]:
    """Partition ``r_`` of LSH band buckets: every pair within the distance in one bucket -> an edge."""
    t = opts["max_distance"]
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in stg.read_part("near", r_):
        groups.setdefault((row["band"], row["val"]), []).append(row)
    edges = {}
    for g in groups.values():
        if len(g) < 2:
            continue
        g.sort(key=lambda r: r["key"])
        for a, b in combinations(g, 2):
            if a["key"] != b["key"] and bin(to_unsigned64(a["phash"]) ^ to_unsigned64(b["phash"])).count("1") <= t:
                edges[(a["key"], b["key"])] = {"a": a["key"], "a_sid": a["sid"], "a_base": a["base"],
                                               "b": b["key"], "b_sid": b["sid"], "b_base": b["base"]}
    P = opts["parts"]
    adj = []
    for k in sorted(edges):
        e = edges[k]
        for x, y in (("a", "b"), ("b", "a")):
            adj.append({"node": e[x], "node_sid": e[f"{x}_sid"], "node_base": e[f"{x}_base"],
                        "nbr": e[y], "nbr_sid": e[f"{y}_sid"], "nbr_base": e[f"{y}_base"]})
    stg.write_parts("adj", f"r{r_:05d}", adj, lambda r: key_part(r["node"], P))
    return {"rows": sum(len(g) for g in groups.values()), "edges": len(edges)}


def _rank(m: dict[str, Any]) -> tuple:
    """``_order`` of a graph node (source ids are unique after the sid stage, so input order never decides)."""
    return (not m["base"], m["sid"], m["key"])


def label_round(stg: Staging, p: int, opts: dict[str, Any]) -> dict[str, int]:
    """Round ``opts["round"]`` of min-label propagation for the near-duplicate nodes of key range ``p``.

    A node's label is the best member (by ``_rank``) it has heard of. Round 0 starts from the node and its
    neighbours; later rounds take the best of the messages sent to the node (its own label, and the labels
    of neighbours that changed). A node whose label changed tells its neighbours. When a round changes no
    label anywhere, every label is its component's best member - the union-find answer, whatever the
    partition count or task timing. Each round rewrites this range's drop file, so the last round's stands.
    """
    k, P = opts["round"], opts["parts"]
    info: dict[str, dict[str, Any]] = {}
    nbrs: dict[str, dict[str, dict[str, Any]]] = {}
    for e in stg.read_part("adj", p):
        info[e["node"]] = {"key": e["node"], "sid": e["node_sid"], "base": e["node_base"]}
        nbrs.setdefault(e["node"], {})[e["nbr"]] = {"key": e["nbr"], "sid": e["nbr_sid"], "base": e["nbr_base"]}
    if k == 0:
        prev = dict(info)
        best = {n: min([info[n], *nbrs[n].values()], key=_rank) for n in info}
    else:
        prev, best = {}, {}
        for m in stg.read_part(f"label{k:05d}", p):
            lab = {"key": m["l_key"], "sid": m["l_sid"], "base": m["l_base"]}
            if m["own"]:
                prev[m["node"]] = lab
            if m["node"] not in best or _rank(lab) < _rank(best[m["node"]]):
                best[m["node"]] = lab
    changed = sorted(n for n in best if best[n]["key"] != prev[n]["key"])
    msgs = [{"node": n, "own": True, "l_key": best[n]["key"], "l_sid": best[n]["sid"], "l_base": best[n]["base"]}
            for n in sorted(best)]
    msgs += [{"node": y, "own": False, "l_key": best[n]["key"], "l_sid": best[n]["sid"], "l_base": best[n]["base"]}
             for n in changed for y in sorted(nbrs[n])]
    stg.write_parts(f"label{k + 1:05d}", f"p{p:05d}", msgs, lambda r: key_part(r["node"], P))
    drops = [_drop(info[n], "near_duplicate", best[n], remove=True)
             for n in sorted(best) if best[n]["key"] != n and not info[n]["base"]]
    stg.write_parts("drop", "near", drops, lambda r: key_part(r["key"], P))
    return {"nodes": len(best), "changed": len(changed), "dropped": len(drops)}


def components(run_round: Callable[[int], list[dict[str, int]]], max_rounds: int = 100_000) -> int:
    """Run label rounds (``run_round(k)`` = one ``label_round`` per partition) until no label changes;
    returns the number of rounds. The caller's state is the per-partition counts, nothing per sample."""
    for k in range(max_rounds):
        if not sum(r["changed"] for r in run_round(k)):
            return k + 1
    raise RuntimeError(f"near-duplicate labels still changing after {max_rounds} rounds")


def assign_stage(stg: Staging, p: int, opts: dict[str, Any]) -> dict[str, int]:
    """Survivors of key range ``p``, grouped by aspect bucket and sorted by key; rejects written."""
    drops = stg.read_part("drop", p)
    gone = {d["key"] for d in drops if d["remove"]}
    stg.put_rejects(f"dedup-p{p:05d}.jsonl", [
        {"source_id": d["sid"], "reason": d["reason"], **({"detail": d["detail"]} if d["detail"] else {})}
        for d in drops])
    by_grid: dict[str, list[dict[str, Any]]] = {}
    for r in stg.read_part("cand", p):
        if r["key"] not in gone:
            by_grid.setdefault(r["grid"], []).append(r)
    for grid, rows in by_grid.items():
        rows.sort(key=lambda r: r["key"])
        stg.put_rows(stg.key("assign", grid, f"p{p:05d}.parquet"), rows)
    return {g: len(rs) for g, rs in by_grid.items()}


def plan_shards(counts: dict[str, dict[int, int]], samples_per_shard: int, first_index: int
                ) -> list[dict[str, Any]]:
    """Per-bucket counts per key-range partition -> shards: ``{"index", "grid", "slices": [[p, lo, hi]]}``.

    Buckets in name order (see :func:`grid_sort_key`); inside a bucket, samples in key order (the
    partitions are key ranges), cut every ``samples_per_shard``. O(shards) memory."""
    shards = []
    idx = first_index
    for grid in sorted(counts, key=grid_sort_key):
        parts = sorted(counts[grid].items())
        total = sum(n for _, n in parts)
        for s0 in range(0, total, samples_per_shard):
            s1 = min(total, s0 + samples_per_shard)
            slices, base = [], 0
            for p, n in parts:
                lo, hi = max(s0, base), min(s1, base + n)
                if lo < hi:
                    slices.append([p, lo - base, hi - base])
                base += n
            shards.append({"index": idx, "grid": grid, "slices": slices, "samples": s1 - s0})
            idx += 1
    return shards


def grid_name(grids: dict[int, tuple[int, int]]) -> str:
    """``{32: (2, 3), 64: (4, 6)}`` -> ``"32-2x3_64-4x6"`` (a storage-key-safe bucket id)."""
    return "_".join(f"{int(r)}-{int(h)}x{int(w)}" for r, (h, w) in sorted(grids.items()))


def parse_grid_name(name: str) -> dict[int, tuple[int, int]]:
    out = {}
    for part in name.split("_"):
        r, hw = part.split("-")
        h, w = hw.split("x")
        out[int(r)] = (int(h), int(w))
    return out


def grid_sort_key(name: str) -> tuple:
    return tuple((r, h, w) for r, (h, w) in sorted(parse_grid_name(name).items()))
