"""Training throughput benchmark (prints JSON). CPU by default; the same script runs on a GPU.

Measures, in one invocation:
  * ``matmul``: this machine's dense fp32 matmul FLOP/s with the threads training uses (the "peak"
    for a CPU MFU);
  * ``trainer``: the real ``sar-scale train`` path (loader, DeepSpeed ZeRO-1, 1 rank) on generated
    token shards: step time, tokens/s, achieved FLOP/s (6*N*tokens + attention) and that over the
    matmul peak (CPU "MFU");
  * ``overhead``: the same model and batches through a plain PyTorch loop (AdamW, clipping) and
    through a DeepSpeed engine (ZeRO-0 and ZeRO-1): DeepSpeed's per-step overhead;
  * ``zero_memory``: per-rank live tensor bytes (params + grads + optimizer state) after one step with
    2 ranks under ZeRO-0 and ZeRO-3 (RSS is useless for this on CPU: the allocator keeps pages).

    python benchmarks/bench_train.py                     # demo-size model, ~2-4 min on 2 busy cores
    python benchmarks/bench_train.py --model fmt-b --steps 3 --skip-memory
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def matmul_flops(n: int = 1024, seconds: float = 2.0) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def peak_two_ranks(seconds: float = 1.0, repeats: int = 5, n: int = 512) -> dict:
    """The matmul peak the way 2 ranks run: two processes, one thread each, measuring at the same time;
    each reports the median of ``repeats`` windows. The sum is the denominator of a 2-rank MFU, a
    process's median that of a 1-thread rank (a single process's all-thread peak varies 2x with load)."""
    code = ("import json,statistics,sys,torch; torch.set_num_threads(1); "
            f"sys.path.insert(0, {str(Path(__file__).parent)!r}); from bench_train import matmul_flops; "
            f"print(json.dumps(statistics.median(matmul_flops({n}, {seconds}) for _ in range({repeats}))))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    per = [float(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    return {"per_rank_flops_per_s": per, "sum_flops_per_s": sum(per), "repeats": repeats, "n": n}


def bench_compile(model: str, grid, mb: int, steps: int, grad_accum: int = 2) -> dict:
    """Plain PyTorch loops, eager vs compiled blocks (inductor), round-robin on the same batches (so
    load from other processes hits both alike): median step time and achieved FLOP/s; and the host
    syncs: a float(loss) after every micro step vs one read of all micro losses per step."""
    import statistics

    import torch

    from sar_scale.models import build_model
    from sar_scale.models.flops import model_shape, train_flops_per_sample
    from sar_scale.sar import set_ar_loss

    torch.manual_seed(0)
    models = {"eager": build_model(model)}
    models["compiled"] = build_model(model)
    models["compiled"].load_state_dict(models["eager"].state_dict())
    models["compiled"].compile_blocks()
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    def run(key, micro_batches, sync_each):
        m, opt = models[key], opts[key]
        losses = []
        for tok, cond, plan in micro_batches:
            loss = set_ar_loss(m(tok, cond, plan), tok) / len(micro_batches)
            loss.backward()
            losses.append(float(loss.detach()) if sync_each else loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        return losses if sync_each else torch.stack(losses).tolist()

    cfg = models["eager"].config
    variants = {"eager": ("eager", False), "compiled": ("compiled", False),
                "compiled_sync_each_micro": ("compiled", True)}
    times = {k: [] for k in variants}
    warm = {}
    for i in range(steps + 1):
        mbs = [_batch(cfg, grid, mb, 100 * i + j) for j in range(grad_accum)]
        for k, (key, sync_each) in variants.items():
            t0 = time.perf_counter()
            run(key, mbs, sync_each)
            if i:
                times[k].append(time.perf_counter() - t0)
            else:  # the first step is warm-up (and the compile)
                warm[k] = time.perf_counter() - t0
    n = grid[0] * grid[1]
    n_cond = 1 if cfg.cond == "class" else 1 + 16  # _batch's 16 text tokens (padding is not model work)
    step_flops = grad_accum * mb * train_flops_per_sample(model_shape(model), n, n_cond)
    out = {"model": model, "grid": list(grid), "micro_batch": mb, "grad_accum": grad_accum, "steps_timed": steps,
           "warmup_s": warm}
    for k, v in times.items():
        med = statistics.median(v)
        out[f"{k}_step_s_median"] = med
        out[f"{k}_achieved_flops_per_s"] = step_flops / med
    out["compiled_speedup"] = out["eager_step_s_median"] / out["compiled_step_s_median"]
    out["sync_each_micro_over_once_per_step"] = (out["compiled_sync_each_micro_step_s_median"]
                                                 / out["compiled_step_s_median"])
    return out


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process (params, grads, optimizer state)."""
    import warnings

    import torch

    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objs:
        try:
            if obj.device.type == "meta":
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - some objects raise on isinstance/storage access
            continue
        if st.data_ptr() in seen or st.nbytes() == 0:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds for parameters and optimizer state (Adam moments + fp32 master partitions).

    Read from the engine: ``param.ds_tensor`` is a rank's ZeRO-3 partition; ZeRO wrappers keep the torch
    optimizer at ``.optimizer`` and their fp32 partitions in ``single_partition_of_fp32_groups`` (1/2) or
    ``fp32_partitioned_groups_flat`` (3). Storages are counted once.
    """
    import torch

    seen: set[int] = set()

    def nbytes(ts) -> int:
        total = 0
        for t in ts:
            if t is None or not torch.is_tensor(t) or t.numel() == 0:
                continue
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        return total

    params = [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in engine.module.parameters()]
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    masters = []
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        masters += list(getattr(opt, attr, None) or [])
    moments = [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    out = {"params": nbytes(params), "fp32_master": nbytes(masters), "adam_moments": nbytes(moments)}
    out["total"] = sum(out.values())
    return out


def _batch(cfg, grid, mb, seed):
    import torch

    from sar_scale.sar import Condition, SetPlan

    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    tokens = torch.randint(0, cfg.vocab_size, (mb, n), generator=g)
    if cfg.cond == "class":
        cond = Condition(class_ids=torch.randint(0, cfg.num_classes, (mb,), generator=g))
    else:
        cond = Condition(text=torch.randn(mb, 16, cfg.text_dim, generator=g))
    plan = SetPlan.build(grid, "random", 16, "random", batch_size=mb, generator=g)
    return tokens, cond, plan


def _train_cfg(model: str, zero: int, mb: int, run_dir: str, data_url: str, steps: int, res: int):
    from sar_scale.config import load_config
    from sar_scale.training.config import TrainConfig

    return load_config(TrainConfig, {
        "run_dir": run_dir, "device": "cpu", "model": {"name": model}, "data": {"url": data_url, "num_workers": 1},
        "deepspeed": {"zero_stage": zero, "timeout_s": 600}, "optim": {"warmup_steps": 0},
        "curriculum": {"stages": [{"name": "bench", "resolution": res, "steps": steps, "micro_batch": mb}]},
        "checkpoint": {"every_steps": 0}, "mlflow": {"enabled": False}})


def bench_overhead(model: str, grid, mb: int, steps: int) -> dict:
    """Plain PyTorch loop vs DeepSpeed engines (ZeRO-0, ZeRO-1) on identical batches, one process.

    The three run round-robin, step by step, and medians are reported, so load from other processes
    on a shared machine hits all of them alike.
    """
    import statistics

    import deepspeed
    import torch

    from sar_scale.distributed.ds_config import deepspeed_config
    from sar_scale.distributed.init import destroy_distributed, init_distributed
    from sar_scale.models import build_model
    from sar_scale.sar import set_ar_loss
    from sar_scale.training.trainer import build_adamw

    init_distributed("gloo", "cpu", 600)
    fns, cfg0 = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        cfg0 = _train_cfg(model, 0, mb, tmp, tmp, steps, 256)
        torch.manual_seed(0)
        pm = build_model(model)
        popt = build_adamw(pm.parameters(), cfg0.optim, 1e-4)  # the trainer's optimizer, in both loops

        def plain(tok, cond, plan, m=pm, opt=popt):
            loss = set_ar_loss(m(tok, cond, plan), tok)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        fns["plain"] = plain
        for zero in (0, 1):
            cfg = cfg0.model_copy(update={"deepspeed": cfg0.deepspeed.model_copy(update={"zero_stage": zero})})
            torch.manual_seed(0)
            m = build_model(model)
            opt = build_adamw(m.parameters(), cfg0.optim, 1e-4)
            engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=deepspeed_config(cfg, 1, 0, mb))

            def ds_step(tok, cond, plan, engine=engine):
                loss = set_ar_loss(engine(tok, cond, plan), tok)
                engine.backward(loss)
                engine.step()
                return float(loss.detach())

            fns[f"deepspeed_zero{zero}"] = ds_step
        batches = [_batch(pm.config, grid, mb, i) for i in range(steps + 1)]
        times = {k: [] for k in fns}
        losses = {k: [] for k in fns}
        for i, b in enumerate(batches):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                losses[k].append(fn(*b))
                if i:  # the first step is warm-up
                    times[k].append(time.perf_counter() - t0)
    destroy_distributed()
    out = {f"{k}_step_s_median": statistics.median(v) for k, v in times.items()}
    for k in ("deepspeed_zero0", "deepspeed_zero1"):
        out[f"{k}_overhead_pct"] = 100 * (out[f"{k}_step_s_median"] / out["plain_step_s_median"] - 1)
        out[f"{k}_max_loss_gap_vs_plain"] = max(abs(a - b) for a, b in zip(losses[k], losses["plain"]))
    return out


def bench_trainer(model: str, grid, mb: int, steps: int, peak: float) -> dict:
    """The real trainer (loader + DeepSpeed ZeRO-1, 1 rank) on generated shards; numbers from metrics.jsonl."""
    from sar_scale.models import get_config
    from sar_scale.training.debug_data import write_debug_shards
    from sar_scale.training.trainer import Trainer

    mcfg = get_config(model)
    res = grid[0] * 16
    with tempfile.TemporaryDirectory() as tmp:
        write_debug_shards(f"{tmp}/shards", num_samples=mb * (steps + 2), resolutions=(res,), max_ratio=1.0,
                           vocab_size=mcfg.vocab_size, num_classes=mcfg.num_classes,
                           text_dim=mcfg.text_dim if mcfg.cond == "text" else None)
        cfg = _train_cfg(model, 1, mb, f"{tmp}/run", f"{tmp}/shards", steps + 1, res)
        Trainer(cfg, resume="none").run()
        recs = [json.loads(x) for x in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()][1:]
    import statistics

    from sar_scale.models import count_parameters

    n = len(recs)
    total_t = sum(r["step_time_s"] for r in recs)
    # per-step rates x step time = per-step amounts; totals over total time (not a mean of ratios)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in recs)
    flops = sum(r["flops_per_s"] * r["step_time_s"] for r in recs)
    return {"model": model, "params_m": count_parameters(model) / 1e6, "grid": list(grid), "micro_batch": mb,
            "steps_timed": n, "step_time_s_mean": total_t / n,
            "step_time_s_median": statistics.median(r["step_time_s"] for r in recs),
            "tokens_per_s": tokens / total_t, "data_wait_s_mean": sum(r["data_wait_s"] for r in recs) / n,
            "achieved_flops_per_s": flops / total_t, "cpu_mfu": flops / total_t / peak}


def bench_zero_memory(model: str, grid, mb: int) -> dict:
    """Launch 2 ranks; each trains one step under ZeRO-0 then ZeRO-3 and reports its live tensor bytes."""
    from sar_scale.utils.net import free_port

    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        for r in range(2):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker-zero-memory", model, str(grid[0]),
                                           str(mb), f"{tmp}/rank{r}.json"], env=env, stdout=sys.stderr))
        codes = [p.wait(1800) for p in procs]
        if any(codes):
            raise RuntimeError(f"zero-memory workers failed: {codes}")
        per_rank = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(2)]
    out = {"world_size": 2, "params": per_rank[0]["0"]["params"]}
    for z in ("0", "3"):
        out[f"zero{z}_model_state_bytes_rank0"] = per_rank[0][z]["state_bytes"]
        out[f"zero{z}_model_state_total_per_rank"] = [pr[z]["state_bytes"]["total"] for pr in per_rank]
        out[f"zero{z}_live_tensor_bytes_per_rank"] = [pr[z]["live_tensor_bytes"] for pr in per_rank]
    out["zero3_over_zero0"] = (out["zero3_model_state_total_per_rank"][0]
                               / out["zero0_model_state_total_per_rank"][0])
    # fp32 Adam, no grads: params 4 + moments 8 (+ fp32 master 4 under ZeRO 1-3) bytes per parameter
    out["theory_bytes"] = {"zero0": 12 * out["params"], "zero3": 16 * out["params"] / 2}
    return out


def _worker_zero_memory(model: str, g: int, mb: int, out_path: str) -> None:
    import deepspeed
    import torch

    from sar_scale.distributed.ds_config import deepspeed_config
    from sar_scale.distributed.init import init_distributed
    from sar_scale.models import build_model
    from sar_scale.sar import set_ar_loss

    init_distributed("gloo", "cpu", 600)
    res = {}
    for zero in (0, 3):
        base = live_tensor_bytes()
        torch.manual_seed(0)
        m = build_model(model)
        params = m.num_parameters()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        cfg = _train_cfg(model, zero, mb, "/tmp", "/tmp", 1, g * 16)
        engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=deepspeed_config(cfg, 2, 0, mb))
        del m, opt
        tok, cond, plan = _batch(engine.module.config, (g, g), mb, torch.distributed.get_rank())
        loss = set_ar_loss(engine(tok, cond, plan), tok)
        engine.backward(loss)
        engine.step()
        del loss, tok, cond, plan
        res[str(zero)] = {"state_bytes": model_state_bytes(engine), "params": params,
                          "live_tensor_bytes": live_tensor_bytes() - base}
        del engine
        gc.collect()
    Path(out_path).write_text(json.dumps(res))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="named FMT size (debug, demo, fmt-b, ...)")
    p.add_argument("--grid", type=int, default=16, help="square token grid side (16 -> 256 tokens)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-trainer", action="store_true")
    p.add_argument("--compile", action="store_true", help="also eager vs compiled blocks (plain loops, inductor)")
    p.add_argument("--peak-only", action="store_true", help="only the matmul peaks (1 process, and 2 ranks)")
    p.add_argument("--worker-zero-memory", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker_zero_memory:
        model, g, mb, out = a.worker_zero_memory
        _worker_zero_memory(model, int(g), int(mb), out)
        return 0
    import contextlib
    import logging


    logging.basicConfig(level=logging.WARNING)
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's op builder prints to stdout: keep JSON clean
        result = _run_all(a)
    print(json.dumps(result, indent=1), file=real_stdout)
    return 0


def _run_all(a) -> dict:
    import torch

    grid = (a.grid, a.grid)
    result = {"device": "cpu", "threads": torch.get_num_threads(), "cores": os.cpu_count(),
              "load_avg_1m_start": os.getloadavg()[0], "torch": torch.__version__}
    peak = matmul_flops()
    result["matmul_fp32_flops_per_s"] = peak
    result["peak_two_ranks"] = two = peak_two_ranks()
    if a.peak_only:
        return result
    if not a.skip_trainer:
        result["trainer"] = bench_trainer(a.model, grid, a.micro_batch, a.steps, peak)
        result["trainer"]["cpu_mfu_vs_two_rank_peak"] = result["trainer"]["achieved_flops_per_s"] / two["sum_flops_per_s"]
    if a.compile:
        result["compile"] = c = bench_compile(a.model, grid, a.micro_batch, a.steps)
        for k in ("eager", "compiled"):
            c[f"{k}_mfu_vs_two_rank_peak"] = c[f"{k}_achieved_flops_per_s"] / two["sum_flops_per_s"]
    if not a.skip_overhead:
        result["overhead"] = bench_overhead(a.model, grid, a.micro_batch, a.steps)
    if not a.skip_memory:
        result["zero_memory"] = bench_zero_memory(a.model, grid, a.micro_batch)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    return result


if __name__ == "__main__":
    raise SystemExit(main())
