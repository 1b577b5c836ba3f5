"""The demo's configs load strictly and its knobs do what --help says (fast, no subprocesses)."""

from __future__ import annotations

import json
import os

import pytest

from sar_scale.config import load_config
from sar_scale.demo import REPO_CONFIGS, SAMPLE_PROMPTS, Demo, main


def test_demo_configs_are_valid():
    from pipelines.config import PrepareConfig
    from sar_scale.models import get_config
    from sar_scale.tokenizers.train import VQTrainConfig
    from sar_scale.training.config import TrainConfig

    tc = load_config(TrainConfig, REPO_CONFIGS / "train.yaml")
    pc = load_config(PrepareConfig, REPO_CONFIGS / "data.yaml", ["input.path=x"])
    vc = load_config(VQTrainConfig, REPO_CONFIGS / "vq.yaml", ["data=x", "out=y"])
    res = [s.resolution for s in tc.curriculum.stages]
    assert len(res) == 2 and res[0] < res[1] and pc.tokenize.resolutions == res  # low then higher res
    model = get_config(tc.model.name, **tc.model.overrides)
    assert model.cond == "text" and model.vocab_size == vc.vq_config().codebook_size
    assert pc.tokenize.text_max_length == model.max_text_len
    assert all(r % vc.vq_config().downsample == 0 for r in res)
    assert model.frac_pos  # multi-aspect buckets: position words need fractional positions (see train.yaml)


def test_minutes_scale_training_steps(tmp_path):
    base = [s["steps"] for s in Demo(tmp_path).train_stages()]
    half = [s["steps"] for s in Demo(tmp_path, minutes=5).train_stages()]
    assert half == [round(b / 2) for b in base]
    assert [s["steps"] for s in Demo(tmp_path, train_steps=[7, 3]).train_stages()] == [7, 3]
    with pytest.raises(ValueError, match="one per curriculum stage"):
        Demo(tmp_path, train_steps=[7]).train_stages()


def test_vq_cache_key_follows_data_and_steps(tmp_path):
    d = Demo(tmp_path)
    labels = tmp_path / "data" / "shapes" / "labels.jsonl"
    labels.parent.mkdir(parents=True)
    labels.write_text(json.dumps({"file": "000000.png"}) + "\n")
    k1 = d.vq_key()
    assert Demo(tmp_path).vq_key() == k1
    assert Demo(tmp_path, vq_steps=5).vq_key() != k1
    labels.write_text(json.dumps({"file": "000001.png"}) + "\n")
    assert d.vq_key() != k1


def test_vq_cache_key_ignores_threads_not_training_settings(tmp_path, monkeypatch):
    import shutil

    import sar_scale.demo as demo_mod

    conf = tmp_path / "configs"
    shutil.copytree(REPO_CONFIGS, conf / "demo")
    shutil.copytree(REPO_CONFIGS.parent / "tokenizer", conf / "tokenizer")
    monkeypatch.setattr(demo_mod, "REPO_CONFIGS", conf / "demo")
    labels = tmp_path / "w" / "data" / "shapes" / "labels.jsonl"
    labels.parent.mkdir(parents=True)
    labels.write_text(json.dumps({"file": "000000.png"}) + "\n")
    d = Demo(tmp_path / "w")
    k1 = d.vq_key()
    vq_yaml = conf / "demo" / "vq.yaml"
    vq_yaml.write_text(vq_yaml.read_text() + "\nthreads: 1\n")  # a speed knob: same VQ
    assert d.vq_key() == k1
    base = conf / "tokenizer" / "demo_small.yaml"  # the file vq.yaml layers over counts too
    base.write_text(base.read_text().replace("lr: 0.002", "lr: 0.001"))
    assert d.vq_key() != k1


def test_prompt_list_covers_the_vocabulary():
    from sar_scale.data.synthetic import COLORS, POSITIONS, SHAPES

    words = " ".join(SAMPLE_PROMPTS).split()
    assert all(w in words for w in [*COLORS, *SHAPES]) and all(
        any(p in s for s in SAMPLE_PROMPTS) for p in POSITIONS)


def test_cli_rejects_bad_values(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "--images", "0"]) == 2
    assert "--images" in capsys.readouterr().err
    assert main(["--workdir", str(tmp_path), "--eval-samples", "0"]) == 2
    assert "--eval-samples" in capsys.readouterr().err
    assert main(["--workdir", str(tmp_path), "--train-steps", "5"]) == 2
    assert "one per curriculum stage" in capsys.readouterr().err


def test_stale_build_lock_is_cleared_fresh_one_kept(tmp_path, monkeypatch):
    """A lock left by a killed JIT build would make torch (and so training) wait forever."""
    import os
    import time

    from sar_scale.distributed.init import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old = tmp_path / "deepspeed_shm_comm" / "lock"
    new = tmp_path / "py311_cpu" / "other_op" / "lock"
    for p in (old, new):
        p.parent.mkdir(parents=True)
        p.write_text("")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert clear_stale_build_locks() == [old]
    assert not old.exists() and new.exists()


def test_stage_threads_default_one_vq_all_cores_user_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    d = Demo(tmp_path)
    assert d.env()["OMP_NUM_THREADS"] == "1" and d.env(threads=2)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert d.env(threads=2)["OMP_NUM_THREADS"] == "3"
    from sar_scale.utils.cpus import usable_cpus

    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
    monkeypatch.delattr(os, "sched_getaffinity")  # no affinity API (macOS): every CPU
    assert usable_cpus() == (os.cpu_count() or 1)
