"""One command for the first GPU hour: what must be learnt, smallest first, each part time-boxed, JSON
written after every measurement (a cut run still reports).

    python benchmarks/gpu_check.py --out gpu_check.json            # one H100/H200, <= ~8 min
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke.json    # CPU, debug sizes (inductor: minutes)
    python benchmarks/gpu_check.py --smoke --compile-backend aot_eager   # what the test suite runs

Parts:
  env       torch / CUDA / driver / GPU name; dense bf16 matmul TFLOP/s measured (the MFU peak).
  train     t2i-900m forward+backward+AdamW at 256 px (16x16 tokens), bf16 autocast: activation
            checkpointing on/off x SDPA/flex x eager/compiled; tokens/s, MFU against the measured
            and the datasheet peak, peak memory against `sar-scale plan`'s estimate.
  sample    1024 px (64x64 = 4096 tokens): AR (4096 steps, KV cache) vs SAR-64 (cache) vs 64 steps
            without cache (the paper's 62x and 3.4x); a run past its time box is stopped and its
            total extrapolated from the steps done (marked "extrapolated").
  images    256 px, batch 64: images/s of SAR-32 vs AR (ARPG's table: 113 vs 4.3 img/s for L-size).
  vq        VQ-16 encode / decode images/s at 256 px (bf16), and bf16 vs fp32 code agreement.

On the CPU (``--smoke``) every part runs with the debug sizes; flex training is recorded as skipped
(torch has no CPU flex backward). Figures on the CPU mean nothing; the smoke run proves the script.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

BACKEND = "inductor"  # --compile-backend; the smoke test uses aot_eager (same dynamo path, no C++ build)
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


class TimeBox(Exception):
    """A part ran past its time box."""


class Report:
    """The JSON document, rewritten after every update."""

    def __init__(self, path: Path, smoke: bool):
        self.path, self.doc = path, {"smoke": smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "parts": {}}
        self.write()

    def set(self, part: str, key: str, value) -> None:
        self.doc["parts"].setdefault(part, {})[key] = value
        self.write()
        print(json.dumps({part: {key: value}}), flush=True)

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        tmp.replace(self.path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int = 1) -> float:
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


# ---------------------------------------------------------------------------------------------- parts
def part_env(rep: Report, dev: torch.device, smoke: bool) -> float:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
            "cuda": torch.version.cuda, "cpu": platform.processor() or platform.machine()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    bf16=torch.cuda.is_bf16_supported())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["driver"] = f"unknown ({e})"
    rep.set("env", "info", info)
    n = 256 if smoke else 8192
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 5 if smoke else 50
    t = _timed(lambda: [a @ b for _ in range(reps)], dev, repeats=3)
    peak = 2 * n**3 * reps / t
    rep.set("env", "matmul", {"n": n, "dtype": str(dtype), "flops_per_s": peak, "tflops": round(peak / 1e12, 2)})
    return peak


def _datasheet(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_properties(dev).name
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def _train_variant(dev, name, overrides, grid, batch, steps, ckpt, compiled, deadline, peak, datasheet) -> dict:
    """One training variant: warm-up step (compiles), then timed steps until ``steps`` or ``deadline``."""
    from sar_scale.models import build_model
    from sar_scale.models.flops import model_shape, train_flops_per_sample
    from sar_scale.sar import Condition, SetPlan, set_ar_loss
    from sar_scale.training.sizing import activation_bytes, zero_state_bytes

    n = grid[0] * grid[1]
    torch.manual_seed(0)
    model = build_model(name, **overrides).to(dev)
    if ckpt:
        model.enable_activation_checkpointing()
    if compiled:
        model.compile_blocks(backend=BACKEND)
    cfg = model.config
    shape = model_shape(name, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, cfg.vocab_size, (batch, n), generator=g).to(dev)
    if cfg.cond == "text":
        cond = Condition(text=torch.randn(batch, cfg.max_text_len // 2, cfg.text_dim, generator=g).to(dev))
    else:
        cond = Condition(class_ids=torch.randint(0, cfg.num_classes, (batch,), generator=g).to(dev))

    def step(seed):
        plan = SetPlan.build(grid, "random", 16, "random", batch_size=batch,
                             generator=torch.Generator().manual_seed(seed))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = set_ar_loss(model(tok, cond, plan), tok)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    step(0)  # warm-up (compiles)
    _sync(dev)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = 0
    for s in range(1, steps + 1):
        last = step(s)
        done += 1
        if time.perf_counter() > deadline:
            break
    _sync(dev)
    dt = (time.perf_counter() - t0) / done
    fl = train_flops_per_sample(shape, n, 1 + cfg.max_text_len // 2 if cfg.cond == "text" else 1) * batch / dt
    row = {"model": name, "grid": list(grid), "batch": batch, "warmup_s": round(warm_s, 2),
           "step_s": round(dt, 4), "steps_timed": done, "tokens_per_s": round(batch * n / dt, 1),
           "flops_per_s": fl, "mfu_measured_peak": round(fl / peak, 4),
           "mfu_datasheet": round(fl / datasheet, 4) if datasheet else None, "loss": float(last)}
    est = zero_state_bytes(shape.params, 0, 1) + activation_bytes(shape, n, batch, ckpt)
    row["plan_estimate_gib"] = round(est / 2**30, 4)
    if dev.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        row["peak_over_estimate"] = round(row["peak_mem_gib"] / row["plan_estimate_gib"], 3)
    return row


def part_train(rep: Report, dev: torch.device, smoke: bool, peak: float, box_s: float) -> None:
    name = "debug" if smoke else "t2i-900m"
    grid, batch, steps = ((4, 4), 2, 2) if smoke else ((16, 16), 16, 6)
    datasheet = _datasheet(dev)
    deadline = time.perf_counter() + box_s
    for impl in ("sdpa", "flex"):
        for compiled in (False, True):
            for ckpt in (False, True):
                key = f"{impl}_{'compiled' if compiled else 'eager'}_{'ac' if ckpt else 'noac'}"
                if dev.type == "cpu" and impl == "flex":
                    rep.set("train", key, {"skipped": "torch has no flex-attention backward on the CPU"})
                    continue
                if time.perf_counter() > deadline:
                    rep.set("train", key, {"skipped": f"part time box {box_s:.0f}s spent"})
                    continue
                overrides = {"attn_impl": impl}
                if not smoke:
                    overrides.update(vocab_size=16384, qk_norm=True, frac_pos=True)
                try:
                    rep.set("train", key, _train_variant(dev, name, overrides, grid, batch, steps, ckpt, compiled,
                                                         deadline, peak, datasheet))
                except Exception as e:  # noqa: BLE001 - a failing variant is a finding, the rest still runs
                    rep.set("train", key, {"error": f"{type(e).__name__}: {e}"[:2000],
                                           "trace": traceback.format_exc()[-3000:]})
                finally:
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    torch._dynamo.reset()


def _sample_timed(model, cond, plan, kv: bool, dev, box_s: float, max_steps: int | None = None) -> dict:
    """One sampling run, stopped at ``box_s`` (or after ``max_steps``: a warm-up that compiles every
    step kind); the total is extrapolated from the steps done then."""
    from sar_scale.sar import sample

    t0 = time.perf_counter()
    state = {"done": 0, "total": 0}

    def progress(step, total):
        state["done"], state["total"] = step, total
        if step < total and (time.perf_counter() - t0 > box_s or (max_steps and step >= max_steps)):
            raise TimeBox

    try:
        sample(model, cond, plan, kv_cache=kv, generator=torch.Generator(device=dev).manual_seed(0), progress=progress)
        _sync(dev)
        return {"s": round(time.perf_counter() - t0, 3), "steps": state["total"]}
    except TimeBox:
        _sync(dev)
        el = time.perf_counter() - t0
        return {"s": round(el * state["total"] / state["done"], 3), "steps": state["total"],
                "steps_done": state["done"], "extrapolated": True}


def part_sample(rep: Report, dev: torch.device, smoke: bool, box_s: float) -> None:
    from sar_scale.models import build_model
    from sar_scale.sar import Condition, SetPlan

    names = ["debug"] if smoke else ["fmt-b", "t2i-900m"]
    grid, k = ((4, 4), 4) if smoke else ((64, 64), 64)
    for name in names:
        for compiled in (False, True):
            key = f"{name}_{'compiled' if compiled else 'eager'}"
            try:
                torch.manual_seed(0)
                model = build_model(name).to(dev).eval()
                if dev.type == "cuda":
                    model = model.to(torch.bfloat16)
                if compiled:
                    model.compile_blocks(backend=BACKEND)
                cfg = model.config
                cond = (Condition(class_ids=torch.zeros(1, dtype=torch.long, device=dev)) if cfg.cond == "class"
                        else Condition(text=torch.randn(1, 16, cfg.text_dim, device=dev)))
                sar = SetPlan.build(grid, "random", k, "cosine", seed=0)
                ar = SetPlan.build(grid, "raster", intervals="ar")
                row = {"grid": list(grid), "sar_steps": k}
                t0 = time.perf_counter()
                for plan, kv in ((sar, True), (sar, False), (ar, True)):  # warm-up: compiles each step kind
                    _sample_timed(model, cond, plan, kv, dev, box_s / 2, max_steps=4)
                row["warmup_s"] = round(time.perf_counter() - t0, 2)
                row["sar_kv"] = _sample_timed(model, cond, sar, True, dev, box_s / 6)
                row["sar_nocache"] = _sample_timed(model, cond, sar, False, dev, box_s / 6)
                row["ar_kv"] = _sample_timed(model, cond, ar, True, dev, box_s / 3)
                row["ar_over_sar"] = round(row["ar_kv"]["s"] / row["sar_kv"]["s"], 2)
                row["nocache_over_cache"] = round(row["sar_nocache"]["s"] / row["sar_kv"]["s"], 2)
                rep.set("sample", key, row)
            except Exception as e:  # noqa: BLE001
                rep.set("sample", key, {"error": f"{type(e).__name__}: {e}"[:2000],
                                        "trace": traceback.format_exc()[-3000:]})
            finally:
                model = None
                torch._dynamo.reset()


def part_images(rep: Report, dev: torch.device, smoke: bool, box_s: float) -> None:
    from sar_scale.models import build_model
    from sar_scale.sar import Condition, SetPlan

    name, grid, batch = ("debug", (4, 4), 8) if smoke else ("fmt-l", (16, 16), 64)
    try:
        torch.manual_seed(0)
        model = build_model(name).to(dev).eval()
        if dev.type == "cuda":
            model = model.to(torch.bfloat16)
        model.compile_blocks(backend=BACKEND)
        cond = Condition(class_ids=torch.arange(batch, device=dev) % model.config.num_classes)
        row = {"model": name, "grid": list(grid), "batch": batch, "compiled": True}
        for label, plan in (("sar32", SetPlan.build(grid, "random", 32, "cosine", batch_size=batch, seed=0)),
                            ("ar", SetPlan.build(grid, "raster", intervals="ar"))):
            _sample_timed(model, cond, plan, True, dev, box_s / 4, max_steps=4)  # warm-up (compiles)
            r = _sample_timed(model, cond, plan, True, dev, box_s / 4)
            r["images_per_s"] = round(batch / r["s"], 2)
            row[label] = r
        row["sar32_over_ar"] = round(row["sar32"]["images_per_s"] / row["ar"]["images_per_s"], 2)
        rep.set("images", "batch", row)
    except Exception as e:  # noqa: BLE001
        rep.set("images", "batch", {"error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]})
    finally:
        torch._dynamo.reset()


def part_vq(rep: Report, dev: torch.device, smoke: bool) -> None:
    from sar_scale.tokenizers.vq import VQConfig, VQModel

    name, res, batch = ("demo-small", 64, 2) if smoke else ("VQ-16", 256, 32)
    try:
        torch.manual_seed(0)
        vq = VQModel(VQConfig.named(name)).to(dev).eval()
        img = torch.rand(batch, 3, res, res, device=dev) * 2 - 1
        dtype = torch.bfloat16 if dev.type == "cuda" else None
        codes = vq.encode(img, dtype=dtype)
        enc = _timed(lambda: vq.encode(img, dtype=dtype), dev, repeats=3)
        dec = _timed(lambda: vq.decode(codes, dtype=dtype), dev, repeats=3)
        agree = float((codes == vq.encode(img)).float().mean())
        rep.set("vq", name, {"res": res, "batch": batch, "encode_img_per_s": round(batch / enc, 1),
                             "decode_img_per_s": round(batch / dec, 1), "bf16_fp32_code_agreement": round(agree, 4)})
    except Exception as e:  # noqa: BLE001
        rep.set("vq", name, {"error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="JSON report, rewritten after every measurement")
    ap.add_argument("--smoke", action="store_true", help="debug sizes (runs on the CPU in seconds)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="whole run (parts get shares of it)")
    ap.add_argument("--parts", nargs="+", default=["env", "train", "sample", "images", "vq"])
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the compiled variants (aot_eager: no code generation)")
    args = ap.parse_args(argv)
    global BACKEND
    BACKEND = args.compile_backend
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.smoke:
        print("gpu_check: no CUDA device; use --smoke for the CPU dry run", file=sys.stderr)
        return 2
    rep = Report(Path(args.out), args.smoke)
    t0 = time.perf_counter()
    share = {"vq": 0.05, "train": 0.45, "sample": 0.3, "images": 0.2}
    peak = part_env(rep, dev, args.smoke) if "env" in args.parts else float("nan")
    for part in ("vq", "train", "sample", "images"):  # smallest first
        if part not in args.parts:
            continue
        left = args.budget_s - (time.perf_counter() - t0)
        if left <= 0:
            rep.set(part, "skipped", "run budget spent")
            continue
        box = min(left, args.budget_s * share.get(part, 0.1))
        pt = time.perf_counter()
        if part == "train":
            part_train(rep, dev, args.smoke, peak, box)
        elif part == "sample":
            part_sample(rep, dev, args.smoke, box)
        elif part == "images":
            part_images(rep, dev, args.smoke, box)
        else:
            part_vq(rep, dev, args.smoke)
        rep.set(part, "part_s", round(time.perf_counter() - pt, 2))
    rep.doc["total_s"] = round(time.perf_counter() - t0, 2)
    rep.write()
    errors = [f"{p}.{k}" for p, d in rep.doc["parts"].items() for k, v in d.items() if isinstance(v, dict) and "error" in v]
    rep.doc["errors"] = errors
    rep.write()
    print(json.dumps({"out": str(args.out), "total_s": rep.doc["total_s"], "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
