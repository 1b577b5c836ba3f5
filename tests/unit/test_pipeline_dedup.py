"""Partitioned dedup + shard planning (pipelines/dedup.py) called directly on local staging files:
the same winners whatever the partition count, equal to a brute-force reference, incumbents win."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines import dedup
from pipelines.staging import Staging, key_part, to_signed64
from sar_scale.data import schema
from sar_scale.data.storage import LocalStorage

T = 4  # phash_max_distance


def _rows(seed: int = 0, n: int = 300) -> list[dict]:
    """Random inputs with planted duplicate source ids, exact pixel duplicates and near-duplicate chains."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        sid = f"img/{i:04d}.jpg"
        rows.append({"sid": sid, "sha": f"{rng.integers(2**62):032x}", "phash": int(rng.integers(0, 2**64, dtype=np.uint64))})
    for i in range(0, n, 10):  # exact duplicate of an earlier one (same pixels, other id)
        rows[i + 1]["sha"] = rows[i]["sha"]
        rows[i + 1]["phash"] = rows[i]["phash"]
    for i in range(2, n - 3, 7):  # near chain: i ~ i+1 ~ i+2 (i and i+2 may be > T apart)
        for j in (1, 2):
            h = rows[i + j - 1]["phash"]
            for bit in rng.choice(64, 3, replace=False):
                h ^= 1 << int(bit)
            rows[i + j]["phash"] = h
    rows += [dict(rows[5]), dict(rows[17])]  # the same source ids listed twice
    out = []
    for u, r in enumerate(rows):
        out.append({"key": schema.sample_key(r["sid"]), "sid": r["sid"], "u": u // 50, "i": u % 50,
                    "img": json.dumps({"k": r["sid"]}), "caption": "c", "extra": "", "w": 64 + u % 3 * 32, "h": 64,
                    "sha": r["sha"], "phash": to_signed64(r["phash"]), "base": False,
                    "grid": dedup.grid_name({32: (4, 4 + u % 3 * 2)})})
    return out


def _run(tmp, rows, parts: int, base: list[dict] = ()) -> tuple[dict, list[dict]]:
    stg = Staging(LocalStorage(tmp))
    opts = {"parts": parts, "exact": True, "near": True, "max_distance": T}
    # what the scan tasks do: stage rows by key range (in 3 producers, like 3 scan tasks)
    for u in range(3):
        stg.write_parts("scan", f"u{u:07d}", [r for j, r in enumerate(rows) if j % 3 == u],
                        lambda r: key_part(r["key"], parts))
    if base:
        stg.write_parts("scan", "b0000000", list(base), lambda r: key_part(r["key"], parts))
    for p in range(parts):
        dedup.sid_stage(stg, p, opts)
    for p in range(parts):
        dedup.exact_stage(stg, p, opts)
    for p in range(parts):
        dedup.near_stage(stg, p, opts)
    dedup.components(lambda k: [dedup.label_round(stg, p, {**opts, "round": k}) for p in range(parts)])
    counts: dict[str, dict[int, int]] = {}
    for p in range(parts):
        for g, n in dedup.assign_stage(stg, p, opts).items():
            counts.setdefault(g, {})[p] = n
    plan = dedup.plan_shards(counts, 7, 0)
    rejects = []
    for k in stg.reject_files():
        rejects += [json.loads(line) for line in stg.storage.get_bytes(k).decode().splitlines()]
    shards = []
    for s in plan:  # the rows each shard writer would read
        rows_s = []
        for p, lo, hi in s["slices"]:
            rows_s += stg.get_rows(stg.key("assign", s["grid"], f"p{p:05d}.parquet"))[lo:hi]
        shards.append((s["index"], s["grid"], [r["sid"] for r in rows_s]))
    return {"shards": shards}, sorted(rejects, key=lambda r: (r["source_id"], r["reason"]))


def _brute(rows: list[dict]) -> tuple[set[str], dict[str, str]]:
    """Reference: first listing of each id; exact groups keep the smallest id; near components (union
    of pairs within T) keep the smallest id."""
    seen, first = set(), []
    for r in sorted(rows, key=lambda r: (r["sid"], r["u"], r["i"])):
        if r["sid"] not in seen:
            seen.add(r["sid"])
            first.append(r)
    fate: dict[str, str] = {}
    by_sha: dict[str, list] = {}
    for r in first:
        by_sha.setdefault(r["sha"], []).append(r)
    alive = []
    for g in by_sha.values():
        g.sort(key=lambda r: r["sid"])
        alive.append(g[0])
        fate.update({r["sid"]: "duplicate" for r in g[1:]})
    parent = {r["sid"]: r["sid"] for r in alive}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    for a in alive:
        for b in alive:
            if a["sid"] < b["sid"] and bin((a["phash"] ^ b["phash"]) & (2**64 - 1)).count("1") <= T:
                ra, rb = find(a["sid"]), find(b["sid"])
                parent[max(ra, rb)] = min(ra, rb)
    comps: dict[str, list[str]] = {}
    for r in alive:
        comps.setdefault(find(r["sid"]), []).append(r["sid"])
    kept = set()
    for members in comps.values():
        members.sort()
        kept.add(members[0])
        fate.update({m: "near_duplicate" for m in members[1:]})
    return kept, fate


def test_partitioned_dedup_matches_brute_force_for_any_partition_count(tmp_path):
    rows = _rows()
    kept, fate = _brute(rows)
    assert len(fate) > 40 and "near_duplicate" in fate.values() and "duplicate" in fate.values()
    results = {parts: _run(tmp_path / f"p{parts}", rows, parts) for parts in (1, 4, 13)}
    for plan, rejects in results.values():
        got_kept = {sid for _, _, sids in plan["shards"] for sid in sids}
        assert got_kept == kept
        assert {r["source_id"]: r["reason"] for r in rejects if r["reason"] != "duplicate_source_id"} == fate
        assert sorted(r["source_id"] for r in rejects if r["reason"] == "duplicate_source_id") == \
            ["img/0005.jpg", "img/0017.jpg"]
    # the plan (shard -> bucket -> samples in key order) does not depend on the partition count
    assert results[1][0] == results[4][0] == results[13][0]
    for _, grid, sids in results[4][0]["shards"]:
        keys = [schema.sample_key(s) for s in sids]
        assert keys == sorted(keys) and 1 <= len(sids) <= 7
    grids = [g for _, g, _ in results[4][0]["shards"]]
    assert grids == sorted(grids, key=dedup.grid_sort_key)  # one bucket per shard, buckets in order


def test_incumbents_from_the_dataset_always_win(tmp_path):
    rows = _rows(seed=1, n=60)
    old = rows[:20]
    base = [{**r, "sid": "", "u": -1, "img": "", "caption": "", "base": True, "grid": ""} for r in old]
    # new inputs: 20 already in the dataset (same ids), a re-encoded copy of one (other id, same pixels)
    # and a near copy of another, plus genuinely new rows
    copy = {**rows[3], "sid": "recrawl/3.jpg", "key": schema.sample_key("recrawl/3.jpg")}
    near = {**rows[7], "sid": "a-near/7.jpg", "key": schema.sample_key("a-near/7.jpg"),
            "phash": to_signed64((rows[7]["phash"] & (2**64 - 1)) ^ 0b101), "sha": "f" * 32}
    new = rows + [copy, near]
    plan, rejects = _run(tmp_path, new, 5, base=base)
    kept = {sid for _, _, sids in plan["shards"] for sid in sids}
    fates = {r["source_id"]: r for r in rejects}
    assert not kept & {r["sid"] for r in old}
    assert all(fates[r["sid"]]["reason"] == "duplicate_source_id" for r in old)
    assert fates["recrawl/3.jpg"]["reason"] == "duplicate"
    assert fates["recrawl/3.jpg"]["detail"] == f"of existing sample {rows[3]['key']}"
    assert fates["a-near/7.jpg"]["reason"] == "near_duplicate"  # smaller id than the incumbent, still loses


def test_a_long_near_duplicate_chain_is_one_component_for_any_partition_count(tmp_path):
    """A chain of 20 images, each 3 bits from the next (ends 57 bits apart; think video frames): the labels
    need many rounds to cross it, and exactly one image - the smallest id, which sits mid-chain - stays."""
    rng = np.random.default_rng(5)
    h = int(rng.integers(0, 2**64, dtype=np.uint64))
    used: set[int] = set()
    rows = []
    for i in range(20):
        if i:
            bits = rng.choice([b for b in range(64) if b not in used], 3, replace=False)  # never flip back
            used.update(int(b) for b in bits)
            for b in bits:
                h ^= 1 << int(b)
        sid = f"frame/{(i * 7 + 10) % 20:03d}.jpg"  # the smallest id, frame/000, is frame 10 of 20
        rows.append({"key": schema.sample_key(sid), "sid": sid, "u": 0, "i": i, "img": "", "caption": "c",
                     "extra": "", "w": 64, "h": 64, "sha": f"{i:032x}", "phash": to_signed64(h), "base": False,
                     "grid": dedup.grid_name({32: (4, 4)})})
    assert bin(to_signed64(h) ^ rows[0]["phash"] & (2**64 - 1)).count("1") > T  # the ends are not near
    rounds = {}
    for parts in (1, 3, 8):
        stg_dir = tmp_path / f"p{parts}"
        plan, rejects = _run(stg_dir, rows, parts)
        kept = [sid for _, _, sids in plan["shards"] for sid in sids]
        assert kept == ["frame/000.jpg"], parts
        assert sorted(r["source_id"] for r in rejects) == sorted(r["sid"] for r in rows if r["sid"] != kept[0])
        assert all(r["reason"] == "near_duplicate" and r["detail"] == "of frame/000.jpg" for r in rejects)
        stg = Staging(LocalStorage(stg_dir))
        rounds[parts] = max(int(k.split("/")[1][5:]) for k in stg.storage.iter_list("_staging/")
                            if k.split("/")[1].startswith("label"))
    assert min(rounds.values()) >= 9  # the best label walked the chain (10 hops to its far end), round by round


def test_label_rounds_that_never_settle_are_an_error():
    with pytest.raises(RuntimeError, match="still changing after 3 rounds"):
        dedup.components(lambda k: [{"changed": 1}], max_rounds=3)


@pytest.mark.parametrize("n,per", [(0, 5), (1, 5), (23, 5), (10, 10)])
def test_plan_shards_cuts_each_bucket_in_key_order(n, per):
    counts = {"32-4x4": {0: n // 3, 2: n - n // 3}} if n else {}
    plan = dedup.plan_shards(counts, per, first_index=4)
    assert [s["index"] for s in plan] == list(range(4, 4 + len(plan)))
    assert sum(s["samples"] for s in plan) == n
    assert all(sum(hi - lo for _, lo, hi in s["slices"]) == s["samples"] <= per for s in plan)
