"""`data prepare` at scale on one machine: driver memory vs dataset size, and worker scaling.

Prints one JSON object with two parts (``--part memory|scaling|all``):

memory    peak RSS of the *driver* process (sampled every 20 ms with psutil; Ray's workers are other
          processes) while `data prepare` runs on N tiny inputs (16 px noise images, a tiny VQ), for
          each N in ``--sizes``; ``growth_mb`` = peak at the largest N - peak at the smallest. With
          ``--old-ref REF`` the same is measured for the pipeline code at git REF (checked out into a
          temporary worktree), e.g. the commit before the redesign.
scaling   256 px photos-like shapes with the demo-small VQ: tokenize+write images/s with 1 and 2
          tokenizer actors (1 CPU each; the rate after the actors loaded their models), end-to-end
          images/s, and the bare ``VQModel.encode`` rate (1 torch thread) on the same bucketed crops,
          measured before and after (the machine is shared).

Usage: .venv/bin/python benchmarks/bench_pipeline.py [--part all] [--sizes 5000 20000 80000]
       [--old-ref HEAD~1] [--n 48] [--res 256]
The VQs have random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- memory


def _tiny_inputs(folder: Path, n: int) -> None:
    """n distinct 16x16 RGB noise PNGs with captions (generated once per n)."""
    import numpy as np
    from PIL import Image

    done = folder / ".done"
    if done.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i // 10000:03d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(sub / f"{i:07d}.png")
        (sub / f"{i:07d}.txt").write_text(f"noise image number {i}")
    done.write_text("ok")


def _tiny_vq(path: Path) -> Path:
    import torch

    from sar_scale.tokenizers.vq import VQConfig, build_vq, save_vq

    if not (path / "config.json").exists():
        torch.manual_seed(0)
        save_vq(build_vq(VQConfig(ch=32, ch_mult=[1, 1, 1, 1], z_channels=8, num_res_blocks=1, codebook_size=16)), path)
    return path


def memory_child(n: int, work: Path) -> dict:
    """Run in a child process (PYTHONPATH = the code under test): one `data prepare` of n tiny inputs."""
    import psutil
    import ray

    from pipelines.config import PrepareConfig
    from pipelines.prepare import run
    from sar_scale.config import load_config

    inputs = work / f"in_{n}"
    _tiny_inputs(inputs, n)
    vq = _tiny_vq(work / "vq")
    out = Path(tempfile.mkdtemp(prefix="out", dir=work))
    cfg = load_config(PrepareConfig, {
        "input": {"path": str(inputs), "files_per_unit": 1000},
        "filters": {"min_side": 8, "max_aspect": 4.0, "caption_min_words": 1, "near_dedup": False},
        "tokenize": {"vq_path": str(vq), "resolutions": [16], "max_ratio": 1.0, "batch_size": 256},
        "output": {"url": str(out), "name": "m", "samples_per_shard": 2000},
        "ray": {"tokenize_actors": 1, "actor_num_cpus": 1.0, "load_num_cpus": 0.25, "scan_num_cpus": 0.5}})
    for attempt in range(3):  # a loaded machine can time a Ray start out
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 - retried, then raised
            if attempt == 2:
                raise
            time.sleep(10)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    s = run(cfg)
    secs = time.perf_counter() - t0
    stop.set()
    th.join()
    ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)
    return {"inputs": n, "samples": s["samples"], "shards": s["shards"], "seconds": round(secs, 1),
            "driver_rss_after_ray_init_mb": round(base / 2**20, 1), "driver_peak_rss_mb": round(peak[0] / 2**20, 1),
            "driver_growth_during_run_mb": round((peak[0] - base) / 2**20, 1)}


def memory(sizes: list[int], code: Path, work: Path) -> dict:
    rows = []
    for n in sizes:
        env = {**os.environ, "PYTHONPATH": str(code), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-memory", str(n), "--work",
                            str(work)], env=env, cwd=code, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"memory child n={n} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return {"runs": rows, "peak_growth_mb_smallest_to_largest":
            round(rows[-1]["driver_peak_rss_mb"] - rows[0]["driver_peak_rss_mb"], 1)}


# ----------------------------------------------------------------------------- scaling


def bare_encode(vq, crops: dict[tuple[int, int], list], threads: int, batch: int) -> float:
    """img/s of VQModel.encode alone on the same bucketed crops the pipeline tokenizes."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    tensors = []
    for imgs in crops.values():
        x = torch.from_numpy(np.stack([np.array(i) for i in imgs])).permute(0, 3, 1, 2).float() / 127.5 - 1
        tensors += [x[i: i + batch] for i in range(0, len(x), batch)]
    vq.encode(tensors[0][:1])  # warm-up
    t0 = time.perf_counter()
    for x in tensors:
        vq.encode(x)
    return sum(len(x) for x in tensors) / (time.perf_counter() - t0)


def bucketed_crops(folder: Path, res: int, downsample: int) -> dict[tuple[int, int], list]:
    from PIL import Image

    from sar_scale.data.buckets import bucket_list, nearest_bucket, resize_center_crop

    buckets = bucket_list(res, downsample)
    out: dict[tuple[int, int], list] = {}
    for f in sorted(folder.glob("*.png")):
        img = Image.open(f).convert("RGB")
        b = nearest_bucket(*img.size, buckets)
        out.setdefault(b, []).append(resize_center_crop(img, b))
    return out


def scaling(n: int, res: int, batch: int) -> dict:
    import ray
    import torch

    from pipelines.config import PrepareConfig
    from pipelines.prepare import run
    from sar_scale.config import load_config
    from sar_scale.data.synthetic import ShapesConfig, generate
    from sar_scale.tokenizers.vq import build_vq, save_vq

    out: dict = {"res": res, "images": n, "vq": "demo-small (random weights)", "batch": batch}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        vq = build_vq("demo-small").eval()
        save_vq(vq, tmp / "vq")
        generate(tmp / "img", ShapesConfig(n=n, seed=0, size=res), progress=False)
        crops = bucketed_crops(tmp / "img", res, vq.downsample)
        out["load_avg_before"] = [round(x, 2) for x in os.getloadavg()]
        bare = [bare_encode(vq, crops, 1, batch)]
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs = {}
        for name, actors in (("1_worker", 1), ("2_workers", 2)):
            cfg = load_config(PrepareConfig, {
                "input": {"path": str(tmp / "img")},
                "filters": {"min_side": 64, "near_dedup": False},
                "tokenize": {"vq_path": str(tmp / "vq"), "resolutions": [res], "batch_size": batch,
                             "load_threads": 1},
                "output": {"url": str(tmp / f"out_{name}"), "samples_per_shard": max(1, n // 8)},
                "ray": {"tokenize_actors": actors, "actor_num_cpus": 1.0}})
            t0 = time.perf_counter()
            s = run(cfg)
            wall = time.perf_counter() - t0
            runs[name] = {"actors": actors, "samples": s["samples"], "wall_s": round(wall, 2),
                          "img_s_end_to_end": round(s["samples"] / wall, 3),
                          "img_s_tokenize_write": s["tokenize_images_per_s"]}
        ray.shutdown()
        bare.append(bare_encode(vq, crops, 1, batch))
        out["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    out["bare_encode_img_s_1thread"] = [round(x, 3) for x in bare]
    out["pipeline"] = runs
    one, two = runs["1_worker"]["img_s_tokenize_write"], runs["2_workers"]["img_s_tokenize_write"]
    out["2_vs_1_workers_tokenize_write"] = round(two / one, 2) if one else None
    out["1_worker_vs_bare_encode"] = round(one / max(bare), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["memory", "scaling", "all"], default="all")
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 80000])
    p.add_argument("--old-ref", default=None, help="also measure driver memory for the code at this git ref")
    p.add_argument("--n", type=int, default=48, help="images of the scaling runs")
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--work", default=None, help="cache folder for the generated inputs (default: a temp dir)")
    p.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if a.child_memory is not None:
        print(json.dumps(memory_child(a.child_memory, Path(a.work))))
        return
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"machine_cpus": os.cpu_count()}
    if a.part in ("memory", "all"):
        out["memory_new"] = memory(a.sizes, REPO, work)
        if a.old_ref:
            old = Path(tempfile.mkdtemp(prefix="old-code-"))
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), a.old_ref], check=True,
                           capture_output=True)
            try:
                sha = subprocess.run(["git", "-C", str(old), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()
                out["memory_old"] = {"ref": a.old_ref, "commit": sha, **memory(a.sizes, old, work)}
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False)
    if a.part in ("scaling", "all"):
        out["scaling"] = scaling(a.n, a.res, a.batch)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
