"""TrainConfig validation, deepspeed_config(), launcher env discovery, redaction, fault specs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sar_scale.config import ConfigError, load_config
from sar_scale.distributed.ds_config import deepspeed_config
from sar_scale.distributed.env import expand_hostlist, get_dist_env, threads_per_rank
from sar_scale.distributed.faults import parse_faults
from sar_scale.training.config import TrainConfig
from sar_scale.training.tracking import flatten
from sar_scale.utils.redact import SecretFilter, is_secret_key, redact_obj, redact_text

REPO = Path(__file__).resolve().parents[2]
BASE = {"data": {"url": "/tmp/x"},
        "curriculum": {"stages": [{"name": "a", "resolution": 64, "steps": 2, "micro_batch": 4, "grad_accum": 3},
                                  {"name": "b", "resolution": 128, "steps": 2, "tokens_per_batch": 256}]}}


def cfg(**over) -> TrainConfig:
    return load_config(TrainConfig, BASE, [f"{k}={v}" for k, v in over.items()])


def test_shipped_configs_load():
    for name in ("debug.yaml", "demo.yaml"):
        c = load_config(TrainConfig, REPO / "configs" / "train" / name)
        assert len(c.curriculum.stages) >= 2
    assert load_config(TrainConfig, REPO / "configs/train/demo.yaml").model.name == "demo"


@pytest.mark.parametrize("over, field", [
    ({"deepspeed.zero_stag": 1}, "zero_stag"),  # typo is an error, not a silent default
    ({"deepspeed.zero_stage": 4}, "deepspeed.zero_stage"),
    ({"deepspeed.precision": "fp16"}, "deepspeed.precision"),
    ({"optim.betas": "[0.9, 1.5]"}, "optim.betas"),
    ({"curriculum.stages": "[{name: a, resolution: 64, steps: 1}]"}, "micro_batch or tokens_per_batch"),
    ({"curriculum.stages": "[{name: a, resolution: 64, steps: 1, micro_batch: 1, tokens_per_batch: 9}]"},
     "exactly one"),
    ({"curriculum.stages": "[{name: a, resolution: 64, steps: 1, micro_batch: 1}, "
                           "{name: a, resolution: 64, steps: 1, micro_batch: 1}]"}, "unique"),
    ({"data.url": "null"}, "data.url is required"),
    ({"data.cond": "text_encoder"}, "data.text_encoder"),
])
def test_bad_config_names_the_field(over, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
        cfg(**over)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_zero_stage(stage):
    c = cfg(**{"deepspeed.zero_stage": stage})
    ds = deepspeed_config(c, world_size=2, stage=0)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 1.0
    assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (stage == 3)
    assert "bf16" not in ds and "optimizer" not in ds  # fp32 on CPU, client optimizer


def test_contiguous_gradients_default_to_the_device_and_a_setting_wins():
    """Unset: on for CUDA (fragmentation), off on the CPU (its per-parameter copies cost ~5% of a step there)."""
    def contig(device, **over):
        return deepspeed_config(cfg(**over), 2, 0, device_type=device)["zero_optimization"]["contiguous_gradients"]

    assert contig("cuda") is True and contig("cpu") is False
    assert contig("cpu", **{"deepspeed.contiguous_gradients": True}) is True
    assert contig("cuda", **{"deepspeed.contiguous_gradients": False}) is False


def test_deepspeed_config_bf16_offload_override_and_checks():
    c = cfg(**{"deepspeed.precision": "bf16", "deepspeed.zero_stage": 2, "deepspeed.offload_optimizer": "cpu"})
    ds = deepspeed_config(c, 4, stage=1, micro_batch=2)
    assert ds["bf16"] == {"enabled": True} and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95] and ds["optimizer"]["params"]["weight_decay"] == 0.05
    over = deepspeed_config(c, 4, 1, 2, override={"zero_optimization": {"reduce_bucket_size": 7},
                                                  "steps_per_print": 5})
    assert over["zero_optimization"]["reduce_bucket_size"] == 7 and over["zero_optimization"]["stage"] == 2
    assert over["steps_per_print"] == 5
    with pytest.raises(ValueError, match="train_batch_size"):
        deepspeed_config(c, 4, 1, 2, override={"train_batch_size": 3})
    with pytest.raises(ValueError, match="tokens_per_batch"):
        deepspeed_config(c, 4, stage=1)  # nominal micro batch needed
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage"):
        deepspeed_config(cfg(**{"deepspeed.offload_optimizer": "cpu", "deepspeed.zero_stage": 0}), 1)


def test_dist_env_torchrun_slurm_and_bare():
    e = get_dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                      "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234",
                      "TORCHELASTIC_RUN_ID": "x"})
    assert (e.rank, e.world_size, e.local_rank, e.node_rank, e.num_nodes) == (3, 4, 1, 1, 2)
    assert (e.master_addr, e.master_port, e.launcher) == ("10.0.0.1", 1234, "torchrun")
    s = get_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                      "SLURM_NTASKS_PER_NODE": "4", "SLURM_NODEID": "1", "SLURM_JOB_ID": "777",
                      "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert (s.rank, s.world_size, s.local_rank, s.local_world_size, s.node_rank) == (5, 8, 1, 4, 1)
    assert s.master_addr == "gpu07" and s.master_port == 20777 and s.launcher == "slurm"
    assert get_dist_env({}).world_size == 1 and get_dist_env({}).launcher == "none"
    with pytest.raises(ValueError, match="RANK"):
        get_dist_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="outside world size"):
        get_dist_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_hostlist_and_threads():
    assert expand_hostlist("gpu[01-03,7],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]
    assert expand_hostlist("n[8-10]-ib") == ["n8-ib", "n9-ib", "n10-ib"]
    assert expand_hostlist("single") == ["single"]
    assert threads_per_rank(2, cores=16) == 8 and threads_per_rank(4, cores=2) == 1


def test_redaction_canary(monkeypatch, caplog):
    canary = "CANARY-s3cr3t-9f8e"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-CANARY-2")
    assert is_secret_key("aws_secret_access_key") and is_secret_key("api-key") and is_secret_key("password")
    assert not is_secret_key("tokens_per_batch") and not is_secret_key("max_text_len")
    data = {"tracking_uri": "https://bob:pw-CANARY@host/x?token=abc&x=1", "nested": {"password": "p1",
            "note": f"key is {canary}", "tokens_per_batch": 256}, "run_name": "tok-CANARY-2"}
    out = redact_obj(data)
    flat = repr(out)
    for s in (canary, "pw-CANARY", "tok-CANARY-2", "abc", "p1"):
        assert s not in flat
    assert out["nested"]["tokens_per_batch"] == 256 and "x=1" in out["tracking_uri"]
    assert redact_text("plain text") == "plain text"
    logger = logging.getLogger("test.redact")
    logger.addFilter(SecretFilter())
    with caplog.at_level(logging.INFO):
        logger.info("uploading with %s", canary)
    assert canary not in caplog.text and "***" in caplog.text


def test_fault_spec_parsing():
    f = parse_faults("kill:after_step:step=5:rank=1; hang:ckpt_files_written:step=2")
    assert [(x.action, x.point, x.step, x.rank) for x in f] == [("kill", "after_step", 5, 1),
                                                                ("hang", "ckpt_files_written", 2, None)]
    for bad in ("boom:after_step:step=1", "kill:after_step", "kill:after_step:rank=1", "kill:x:step=a"):
        with pytest.raises(ValueError, match="SAR_SCALE_FAULT"):
            parse_faults(bad)


def test_flatten_for_mlflow_params():
    flat = flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "stages": [{"name": "x"}, {"name": "y"}], "e": {}})
    assert flat == {"a.b": 1, "a.c.d": [1, 2], "stages.0.name": "x", "stages.1.name": "y", "e": {}}


def test_cli_print_config_merges_deepspeed_override_and_rejects_bad_input(tmp_path, capsys, monkeypatch):
    from sar_scale.training.cli import main

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "CANARY-cli-1234")
    cfg = REPO / "configs" / "train" / "debug.yaml"
    assert main([str(cfg), "deepspeed.zero_stage=3", "mlflow.run_name=CANARY-cli-1234", "--print-config",
                 "--deepspeed-config", '{"steps_per_print": 7}']) == 0
    out = capsys.readouterr().out
    assert '"stage": 3' in out and '"steps_per_print": 7' in out
    assert '"stage3_gather_16bit_weights_on_model_save": true' in out
    assert "CANARY-cli-1234" not in out
    ds = tmp_path / "ds.json"
    ds.write_text('{"gradient_clipping": 0.5}')
    assert main([str(cfg), "--print-config", "--deepspeed-config", str(ds)]) == 0
    assert '"gradient_clipping": 0.5' in capsys.readouterr().out
    # the DeepSpeed JSON of the device the job would use (a cuda config prints the CUDA variant anywhere)
    assert main([str(cfg), "device=cuda", "--print-config"]) == 0
    assert '"contiguous_gradients": true' in capsys.readouterr().out
    assert main([str(cfg), "device=cpu", "--print-config"]) == 0
    assert '"contiguous_gradients": false' in capsys.readouterr().out
    assert main([str(cfg), "--print-config", "--deepspeed-config", "{not json"]) == 2
    assert "--deepspeed-config" in capsys.readouterr().err
    assert main([str(cfg), "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err


def test_tracker_logging_failure_does_not_stop_training(tmp_path, caplog, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sar_scale.training.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = Tracker(True, tmp_path, experiment="unit-tracker")
    run_id = t.start(None, {"optim": {"lr": 0.1}, "password": "hunter2-CANARY"})
    with caplog.at_level(logging.WARNING):
        t.log_metrics({"bad metric name?!": 1.0}, step=1)  # MLflow rejects the name: warned, not raised
        t.log_metrics({"loss": 2.0}, step=1)
    assert "MLflow log_metrics failed" in caplog.text
    t.end()
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.data.metrics["loss"] == 2.0 and run.data.params == {"optim.lr": "0.1", "password": "***"}
    assert (tmp_path / "mlflow_run_id").read_text() == run_id
    # a second Tracker (a resumed job) reattaches to the same run from the run folder
    t2 = Tracker(True, tmp_path, experiment="unit-tracker")
    assert t2.start(None, {"optim": {"lr": 0.2}}) == run_id
    t2.end()
    tags = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.tags
    assert tags["resume.changed.optim.lr"] == "0.2"


def test_stage_rope_settings_reach_that_stages_model():
    from sar_scale.training.trainer import Trainer

    c = cfg(**{"curriculum.stages": "[{name: a, resolution: 64, steps: 1, micro_batch: 1}, {name: b, "
               "resolution: 128, steps: 1, micro_batch: 1, rope_scaling: ntk, rope_train_grid: [4, 4]}]"})
    t = Trainer(c, resume="none")
    a, b = t._build_model(0), t._build_model(1)
    assert a.rope.scaling == "none" and (b.rope.scaling, b.rope.train_grid) == ("ntk", (4, 4))
    b.load_state_dict(a.state_dict())  # same weights: the next stage can start from the previous one


def test_tracker_leaves_no_tracking_uri_behind(tmp_path, monkeypatch):
    """Two runs in one process each get their own embedded store (MLflow exports the URI it is given)."""
    import os

    from sar_scale.training.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        t = Tracker(True, tmp_path / name, experiment="e")
        assert t.uri.endswith(f"{name}/mlflow.db")
        t.start(None, {})
        t.end()
        assert "MLFLOW_TRACKING_URI" not in os.environ


def test_default_mlflow_run_name_names_the_recipe_and_stages():
    from sar_scale.training.trainer import default_run_name

    assert default_run_name(cfg()) == "train: debug random-16-random a+b"
    c = cfg(**{"plan.orders": "{raster: 1.0}", "plan.intervals": "{ar: 1.0}", "run_dir": "runs/ar-lab"})
    assert default_run_name(c) == "ar-lab: debug raster-ar a+b"
    c = cfg(**{"plan.orders": "{random: 1.0, raster: 0.0}", "plan.num_sets": "[8, 16]", "plan.intervals": "{cosine: 1.0}"})
    assert default_run_name(c).split(": ", 1)[1] == "debug random-8+16-cosine a+b"


def test_untrainable_attention_compile_combinations_refused_at_load():
    """flex has no CPU backward (eager or compiled) and compile does not go with ZeRO-3's hooks: refused
    when the config is loaded, naming what works, instead of a traceback at the first step."""
    with pytest.raises(ConfigError, match="attn_impl=sdpa"):
        cfg(**{"device": "cpu", "model.overrides": "{attn_impl: flex}"})
    with pytest.raises(ConfigError, match="attn_impl=sdpa"):
        load_config(TrainConfig, REPO / "configs/t2i_900m/stage1_256.yaml", ["device=cpu"])
    c = load_config(TrainConfig, REPO / "configs/t2i_900m/stage1_256.yaml",
                    ["device=cpu", "model.overrides.attn_impl=sdpa"])
    assert c.model.compile and c.model.overrides["attn_impl"] == "sdpa"
    assert cfg(**{"device": "cuda", "model.overrides": "{attn_impl: flex}"}).device == "cuda"
    with pytest.raises(ConfigError, match="zero_stage 0, 1 or 2"):
        cfg(**{"model.compile": "true", "deepspeed.zero_stage": 3})
    with pytest.raises(ConfigError, match="unknown model size"):
        cfg(**{"model.name": "fmt-xxl"})


def test_model_compile_compiles_the_blocks():
    from sar_scale.training.trainer import Trainer

    model = Trainer(cfg(**{"model.compile": "true"}))._build_model(0)
    assert model.compiled and all(b._compiled_call_impl is not None for b in (*model.encoder, *model.decoder))
    assert not Trainer(cfg())._build_model(0).compiled


def test_adamw_implementation_follows_the_config():
    import torch

    from sar_scale.training.trainer import build_adamw

    params = [torch.nn.Parameter(torch.ones(3))]
    got = {impl: build_adamw(params, cfg(**{"optim.implementation": impl}).optim, 1e-3).defaults
           for impl in ("auto", "fused", "foreach", "for-loop")}
    assert got["auto"]["fused"] and got["fused"]["fused"]
    assert got["foreach"]["foreach"] is True and not got["foreach"]["fused"]
    assert got["for-loop"]["foreach"] is False and not got["for-loop"]["fused"]
    assert got["auto"]["betas"] == (0.9, 0.95) and got["auto"]["lr"] == 1e-3
    # the fused and for-loop kernels take the same step (to float rounding)
    steps = {}
    for impl in ("fused", "for-loop"):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 7))
        opt = build_adamw([p], cfg(**{"optim.implementation": impl}).optim, 1e-2)
        for _ in range(3):
            p.grad = p.detach() ** 2
            opt.step()
        steps[impl] = p.detach()
    torch.testing.assert_close(steps["fused"], steps["for-loop"])
