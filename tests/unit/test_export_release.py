"""Export writing: sharded safetensors + index, config.json, model card, verification, strict loading,
checkpoint resolution (commit markers, checksums), ZeRO-0 / universal layouts, restricted unpickling.

DeepSpeed ZeRO-2/3 checkpoints of a real 2-rank run are exported in tests/integration/test_export_zero.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sar_scale.checkpoint.consolidate import consolidated_state
from sar_scale.checkpoint.manager import COMPLETE, TRAIN_STATE, CheckpointError, sha256_file
from sar_scale.config import ConfigError
from sar_scale.export.checkpoints import ExportError, resolve_local
from sar_scale.export.config import SourceInfo, read_export_config
from sar_scale.export.pipeline import load_model
from sar_scale.export.release import export_checkpoint, write_export
from sar_scale.export.weights import load_state_dict
from sar_scale.models import build_model
from tests.export_parts import TEXT_WIDTH, build_parts, export_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    return build_parts(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="module")
def text_export(parts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "text"
    export_tiny(parts, out, source=SourceInfo(checkpoint="https://alice:hunter2@host/ckpt?token=s3cr3t",
                                              mlflow_run_id="abc123", global_step=42),
                data=[{"stage": "s64", "url": "s3://bucket/shards?X-Amz-Signature=deadbeef", "samples": 7}])
    return out


def test_export_layout_config_and_exact_reload(parts, text_export):
    files = sorted(p.relative_to(text_export).as_posix() for p in text_export.rglob("*") if p.is_file())
    assert {"config.json", "README.md", "model.safetensors", "vq/config.json", "vq/model.safetensors",
            "text_encoder/config.json", "text_encoder/model.safetensors"} <= set(files)
    assert not any(f.endswith((".pt", ".bin", ".tmp")) for f in files)  # nothing pickled, nothing half-written
    cfg = read_export_config(text_export)
    assert cfg.fmt_config() == parts["text_model"].config
    assert (cfg.vq.downsample, cfg.vq.codebook_size) == (8, 1024)
    assert cfg.text_encoder.dim == TEXT_WIDTH and cfg.text_encoder.max_length == 16
    assert cfg.resolutions == [64, 128] and cfg.default_resolution == 64
    assert cfg.weights.files == ["model.safetensors"] and not cfg.weights.sharded
    assert cfg.weights.num_parameters == parts["text_model"].num_parameters()
    assert cfg.verification.passed and cfg.verification.max_abs_logit_diff == 0.0
    reloaded = load_model(text_export)
    for k, v in parts["text_model"].state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


def test_model_card_has_facts_and_no_secrets(text_export):
    card = (text_export / "README.md").read_text()
    assert "abc123" in card and "| global step | 42 |" in card and "text-to-image" in card
    assert "SARPipeline.from_pretrained" in card and "| s64 |" in card
    for secret in ("hunter2", "s3cr3t", "deadbeef"):
        assert secret not in card
        assert secret not in (text_export / "config.json").read_text()


def test_sharded_weights_with_index_and_stale_files_removed(parts, tmp_path):
    out = tmp_path / "sharded"
    cfg = export_tiny(parts, out, cond="class", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and cfg.weights.sharded and cfg.weights.files == shards
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    state = parts["class_model"].state_dict()
    assert set(index["weight_map"]) == set(state)
    for f in shards:  # each shard holds exactly what the index says, each under the size limit
        part = load_file(str(out / f))
        assert {k for k, v in index["weight_map"].items() if v == f} == set(part)
        assert (out / f).stat().st_size < 100_000 + 10_000 or len(part) == 1
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in state.values())
    loaded = load_state_dict(out)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # re-export unsharded into the same directory: no stale shards or index survive
    export_tiny(parts, out, cond="class")
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_bf16_export(parts, tmp_path):
    cfg = export_tiny(parts, tmp_path / "bf16", cond="class", dtype="bf16")
    st = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in st.values())
    assert cfg.weights.dtype == "bf16" and cfg.verification.passed
    assert cfg.verification.max_abs_logit_diff == 0.0
    assert 0 < cfg.verification.max_abs_logit_diff_vs_fp32 < 0.5  # rounding to bf16 moves logits a little
    ref = parts["class_model"].state_dict()
    got = load_model(tmp_path / "bf16").state_dict()  # pipelines compute in fp32 by default
    assert all(torch.equal(got[k], ref[k].to(torch.bfloat16).float()) for k in ref)


def test_bad_parts_are_named(parts, tmp_path):
    m = parts["text_model"]
    with pytest.raises(ExportError, match="codebook of 1024.*vocab_size is 64"):
        small = build_model("debug")
        write_export(tmp_path / "a", small.state_dict(), small.config, vq=parts["vq"])
    with pytest.raises(ExportError, match="text encoder is required"):
        write_export(tmp_path / "b", m.state_dict(), m.config, vq=parts["vq"])
    wide = build_model("debug", cond="text", vocab_size=1024, text_dim=48)
    with pytest.raises(ExportError, match="width 32, the model's text_dim is 48"):
        write_export(tmp_path / "c", wide.state_dict(), wide.config, vq=parts["vq"], text_encoder=parts["te"])
    state = dict(m.state_dict())
    state.pop("head.weight")
    state["extra.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"(?s)missing \(1\): \['head.weight'\].*unexpected \(1\): \['extra.bias'\]"):
        write_export(tmp_path / "d", state, m.config, vq=parts["vq"], text_encoder=parts["te"])
    assert not (tmp_path / "d" / "config.json").exists()


def test_loading_refuses_broken_exports(text_export, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(text_export, broken)
    data = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**data, "colour": "red"}))
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        read_export_config(broken)
    (broken / "config.json").write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ConfigError, match="format_version 99 is newer"):
        read_export_config(broken)
    (broken / "config.json").write_text(json.dumps({**data, "vq": {**data["vq"], "codebook_size": 512}}))
    with pytest.raises(ConfigError, match=r"vocab_size \(1024\) != vq.codebook_size \(512\)"):
        read_export_config(broken)
    (broken / "config.json").write_text(json.dumps(data))
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors and no model.safetensors.index.json"):
        load_model(broken)
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        read_export_config(broken)


# ----------------------------------------------------------------------------- checkpoint sources


def _commit(ckpt: Path) -> None:
    """Write a COMPLETE.json like sar_scale.checkpoint.manager does."""
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE)
    marker = {"tag": ckpt.name, "files": {f: {"sha256": sha256_file(ckpt / f), "bytes": (ckpt / f).stat().st_size}
                                          for f in files}}
    (ckpt / COMPLETE).write_text(json.dumps(marker))


def _train_state(step: int, model: str = "debug", overrides: dict | None = None) -> dict:
    return {"global_step": step, "stage": 0, "stage_name": "s64", "data": {"epoch": 0, "step": 0},
            "zero_stage": 0, "world_size": 1, "mlflow_run_id": None, "last_loss": 1.5,
            "config": {"model": {"name": model, "overrides": overrides or {}},
                       "curriculum": {"stages": [{"name": "s64", "resolution": 64, "steps": step}]},
                       "plan": {"orders": {"raster": 1.0, "random": 2.0}, "num_sets": [4, 8],
                                "intervals": {"random": 1.0}}}}


def test_zero0_checkpoint_export_end_to_end(parts, tmp_path):
    """A ZeRO-0 layout (full weights in mp_rank_00_model_states.pt), picked from a run folder."""
    model = build_model("debug", vocab_size=1024)
    root = tmp_path / "run" / "checkpoints"
    good, torn = root / "step00000004", root / "step00000008"
    for ck, step in ((good, 4), (torn, 8)):
        ck.mkdir(parents=True)
        torch.save({"module": model.state_dict(), "global_steps": step}, ck / "mp_rank_00_model_states.pt")
        (ck / TRAIN_STATE).write_text(json.dumps(_train_state(step, overrides={"vocab_size": 1024})))
    _commit(good)  # step 8 never got its commit marker: its save was interrupted
    src = resolve_local(tmp_path / "run")
    assert src.path == good and src.kind == "stage0" and src.verified
    res = export_checkpoint(str(tmp_path / "run"), tmp_path / "out", vq=str(parts["vq"]))
    cfg = res.config
    assert cfg.source.kind == "stage0" and cfg.source.global_step == 4 and cfg.source.last_loss == 1.5
    assert cfg.sampling.order == "random" and cfg.sampling.num_sets == 8 and cfg.sampling.intervals == "random"
    assert cfg.resolutions == [64] and cfg.vq.source == str(parts["vq"])
    assert cfg.sampling.temperature == 1.0
    got = load_model(tmp_path / "out").state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    # the settings a release was evaluated with ship as its defaults; bad ones fail before any work
    res = export_checkpoint(str(tmp_path / "run"), tmp_path / "out2", vq=str(parts["vq"]),
                            sampling=["temperature=0.3", "num_sets=4"])
    assert res.config.sampling.temperature == 0.3 and res.config.sampling.num_sets == 4
    assert read_export_config(tmp_path / "out2").sampling.recipe.name((8, 8)) == "random-4-random"
    with pytest.raises(ConfigError, match="temprature"):
        export_checkpoint(str(tmp_path / "run"), tmp_path / "out3", vq=str(parts["vq"]), sampling=["temprature=0.3"])
    with pytest.raises(ConfigError, match="sampling|order"):
        export_checkpoint(str(tmp_path / "run"), tmp_path / "out3", vq=str(parts["vq"]), sampling=["order=diagonal"])
    assert not (tmp_path / "out3").exists()
    with pytest.raises(ExportError, match="incomplete checkpoint"):
        resolve_local(torn)
    (good / "mp_rank_00_model_states.pt").write_bytes(b"tampered")
    with pytest.raises(ExportError, match="mp_rank_00_model_states.pt: size"):
        resolve_local(good)


def test_universal_checkpoint_layout(parts, tmp_path):
    """ds_to_universal's output: zero/<param>/fp32.pt holding {"param": tensor}; no train_state needed."""
    model = build_model("debug", vocab_size=1024)
    ck = tmp_path / "universal" / "global_step3"
    for name, t in model.state_dict().items():
        (ck / "zero" / name).mkdir(parents=True)
        torch.save({"param": t.clone(), "cat_dim": 0}, ck / "zero" / name / "fp32.pt")
        torch.save({"exp_avg": torch.zeros_like(t)}, ck / "zero" / name / "exp_avg.pt")
    with pytest.raises(ExportError, match="cannot tell the model architecture.*--model-config"):
        export_checkpoint(str(ck), tmp_path / "o1", vq=str(parts["vq"]))
    cfg_file = tmp_path / "fmt.json"
    cfg_file.write_text(json.dumps(model.config.model_dump()))
    res = export_checkpoint(str(ck), tmp_path / "o2", vq=str(parts["vq"]), model_config=str(cfg_file))
    assert res.config.source.kind == "universal" and res.config.source.global_step == 3
    assert any("not verified" in n for n in res.notes)
    got = load_model(tmp_path / "o2").state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


class _Payload:
    """Unpickling this would create a file: proof that code in a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_code_in_a_checkpoint_never_runs(tmp_path):
    ck = tmp_path / "evil" / "global_step1"
    ck.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, ck / "mp_rank_00_model_states.pt")
    src = resolve_local(ck)
    with pytest.raises(CheckpointError, match=r"(?s)refused to unpickle.*pathlib.*--trust-checkpoint"):
        consolidated_state(src.path, src.kind)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored afterwards
    # the restriction is what stopped it: an explicitly trusted load does run the payload
    consolidated_state(src.path, src.kind, trust=True)
    assert marker.exists()
