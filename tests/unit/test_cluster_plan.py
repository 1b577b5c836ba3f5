"""The 900M run configs load with TrainConfig, the stage-directory rules hold, and `plan` adds up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cluster.curriculum import job_slug, stage_commands
from cluster.plan import main as plan_main
from sar_scale.config import ConfigError, load_config
from sar_scale.models.flops import model_shape, train_flops_per_sample
from sar_scale.training.config import TrainConfig
from sar_scale.training.curriculum import check_stage_files, stage_files
from sar_scale.training.sizing import activation_bytes, ema_bytes, zero_state_bytes

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "configs" / "t2i_900m"


def test_900m_stage_files_load_and_chain():
    files = stage_files(RUN)
    assert [f.name for f in files] == ["stage1_256.yaml", "stage2_512.yaml", "stage3_1024.yaml"]
    cfgs = check_stage_files(files)
    full = cfgs[-1]
    assert isinstance(full, TrainConfig) and full.model.name == "t2i-900m"
    assert [s.resolution for s in full.curriculum.stages] == [256, 512, 1024]
    assert all(c.run_dir == full.run_dir for c in cfgs)
    assert full.data.url.startswith("s3://") and full.checkpoint.mirror_url.startswith("s3://")
    assert full.deepspeed.precision == "bf16" and full.deepspeed.zero_stage in (1, 2, 3)
    assert [job_slug(f) for f in files] == ["stage1-256", "stage2-512", "stage3-1024"]
    chain = stage_commands(RUN, ["seed=3"], "chain")
    assert [c[1][1] for c in chain] == [str(f) for f in files]
    assert all(c[1][2:] == ["--resume", "auto", "seed=3"] for c in chain)
    single = stage_commands(RUN, [], "single")
    assert len(single) == 1 and single[0][1][1].endswith("stage3_1024.yaml")


def _copy_run(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(RUN, d)
    return d


def test_stage_file_that_breaks_the_prefix_is_rejected(tmp_path):
    d = _copy_run(tmp_path)
    p = d / "stage2_512.yaml"
    data = yaml.safe_load(p.read_text())
    data["curriculum"]["stages"][0]["steps"] = 1  # stage 1 no longer matches stage1_256.yaml
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="stage2_512.yaml: curriculum.stages must be stage1_256.yaml's stages"):
        check_stage_files(stage_files(d))


def test_stage_files_must_share_the_run_dir(tmp_path):
    d = _copy_run(tmp_path)
    p = d / "stage3_1024.yaml"
    p.write_text(p.read_text() + "run_dir: /elsewhere\n")
    with pytest.raises(ConfigError, match="stage3_1024.yaml: run_dir differs"):
        check_stage_files(stage_files(d))


def test_stage_directory_errors(tmp_path):
    with pytest.raises(ConfigError, match="no stage<N>_<name>.yaml files"):
        stage_files(tmp_path)
    (tmp_path / "stage1_a.yaml").write_text("{}")
    (tmp_path / "stage1_b.yaml").write_text("{}")
    with pytest.raises(ConfigError, match="share a number"):
        stage_files(tmp_path)


def test_zero_formulas():
    p = 1_000_000_000
    assert zero_state_bytes(p, 0, 32) == 16 * p
    assert zero_state_bytes(p, 1, 32) == pytest.approx(4 * p + 12 * p / 32)
    assert zero_state_bytes(p, 2, 32) == pytest.approx(2 * p + 14 * p / 32)
    assert zero_state_bytes(p, 3, 32) == pytest.approx(16 * p / 32)
    assert zero_state_bytes(p, 3, 1) == zero_state_bytes(p, 0, 1)  # one rank: nothing to partition
    with pytest.raises(ValueError):
        zero_state_bytes(p, 4, 8)


def test_flops_and_activations_scale_sensibly():
    cfg = load_config(TrainConfig, RUN / "stage3_1024.yaml")
    s = model_shape(cfg.model.name, **cfg.model.overrides)
    assert 850e6 < s.params < 950e6
    # linear FLOPs dominate: ~6 x params x tokens within 2x at 256 tokens (+ condition tokens)
    f256 = train_flops_per_sample(s, 256)
    assert 6 * s.params * 256 < f256 < 2 * 6 * s.params * (256 + s.cond_tokens)
    # per image token: the fixed condition context costs most at 256 tokens, quadratic attention at 4096
    per_tok = {n: train_flops_per_sample(s, n) / n for n in (256, 1024, 4096)}
    assert per_tok[1024] < per_tok[256] and per_tok[1024] < per_tok[4096]
    assert all(v > 6 * s.params for v in per_tok.values())
    full = activation_bytes(s, 4096, 4, checkpointing=False)
    ckpt = activation_bytes(s, 4096, 4, checkpointing=True)
    assert ckpt < full / 4
    assert activation_bytes(s, 4096, 8, False) == pytest.approx(2 * full)


def test_plan_cli_json_for_the_900m_run(capsys):
    rc = plan_main([str(RUN), "--profile", str(REPO / "configs/cluster/h100-slurm.yaml"), "--json", "--mfu", "0.4"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cluster"]["world_size"] == 32 and out["cluster"]["peak_tflops"] == 989.0
    st = out["stages"]
    assert [s["resolution"] for s in st] == [256, 512, 1024]
    assert [s["tokens_per_image"] for s in st] == [256, 1024, 4096]
    assert all(s["fits"] for s in st)
    for s in st:
        assert s["tokens_per_global_batch"] == pytest.approx(s["micro_batch"] * s["grad_accum"] * 32 * s["tokens_per_image"])
        assert s["gpu_hours"] == pytest.approx(s["step_time_s"] * s["steps"] * 32 / 3600)
        assert s["model_states_gib"] == pytest.approx(zero_state_bytes(out["model"]["params"], 2, 32) / 1024**3)
        # the run keeps an fp32 EMA (ema.enabled): a full copy per rank under ZeRO-2, counted in the total
        assert s["ema_gib"] == pytest.approx(4 * out["model"]["params"] / 1024**3)
        assert s["total_per_rank_gib"] == pytest.approx(s["model_states_gib"] + s["ema_gib"] + s["activations_gib"])
    assert ema_bytes(10, 3, 4) == 10.0 and ema_bytes(10, 1, 4) == 40.0  # ZeRO-3: each rank its partition
    # half the MFU, twice the GPU-hours
    capsys.readouterr()
    plan_main([str(RUN), "--nodes", "4", "--gpus-per-node", "8", "--json", "--mfu", "0.2"])
    slow = json.loads(capsys.readouterr().out)
    assert slow["total"]["gpu_hours"] == pytest.approx(2 * out["total"]["gpu_hours"])


def test_plan_table_and_errors(capsys):
    assert plan_main([str(RUN / "stage1_256.yaml"), "--nodes", "1", "--gpus-per-node", "8"]) == 0
    text = capsys.readouterr().out
    assert "s1-256" in text and "GPU-hours" in text and "8 ranks" in text
    assert plan_main(["configs/missing.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert plan_main([str(RUN), "--mfu", "1.5"]) == 2
    assert "--mfu" in capsys.readouterr().err


def test_c2i_recipe_families_and_sizes(capsys):
    """configs/c2i: four recipe families over one base; fmt-b/l/xl by override, sized by `sar-scale plan`."""
    from sar_scale.sar.plan import PlanSampler
    from sar_scale.training.config import TrainConfig

    c2i = Path(__file__).resolve().parents[2] / "configs" / "c2i"
    plans = {}
    for fam in ("ar-raster", "sar-ts", "mar-like", "fixed-random"):
        c = load_config(TrainConfig, c2i / f"{fam}.yaml")
        assert c.model.name == "fmt-b" and c.model.overrides["cond"] == "class" and c.ema.enabled
        assert (c.optim.lr, c.optim.weight_decay, c.optim.betas, c.optim.grad_clip) == (1e-4, 0.05, (0.9, 0.95), 1.0)
        assert c.model.overrides["cond_dropout"] == 0.1 and c.data.class_field == "extra.class_id"
        PlanSampler(c.plan)  # a drawable recipe
        plans[fam] = (tuple(c.plan.orders), tuple(c.plan.intervals), tuple(c.plan.num_sets))
    assert plans["ar-raster"] == (("raster",), ("ar",), (256,))
    assert plans["sar-ts"] == (("random",), ("random",), (16,))
    assert plans["fixed-random"][0] == ("fixed_random",) and plans["mar-like"][1] == ("cosine",)
    params = {}
    for size in ("fmt-b", "fmt-l", "fmt-xl"):
        assert plan_main([str(c2i / "sar-ts.yaml"), f"model.name={size}", "--nodes", "1", "--gpus-per-node", "8",
                     "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        params[size] = out["model"]["params"]
        st = out["stages"][0]
        assert st["global_batch"] == 256 and st["tokens_per_image"] == 256 and st["fits"]
    assert params["fmt-b"] < params["fmt-l"] < params["fmt-xl"]
    assert plan_main([str(c2i), "model.name=fmt-l"]) == 2  # overrides need one file
