"""Bad configuration fails fast, naming the field and the allowed values (promise 6).

Generic over every config class in the code base (every ``StrictModel`` subclass, found by import): an
unknown key is an error at the top level and inside every nested section, every enumerated field lists
its allowed values, every numeric bound names the field. Then the cross-field rules and the CLIs.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
import types
import typing
from typing import Any, Literal

import annotated_types
import pytest
import yaml
from pydantic import BaseModel

from sar_scale.config import ConfigError, StrictModel, load_config

pytestmark = [pytest.mark.faults]

_SKIP_MODULES = ("__main__",)


def _all_config_classes() -> list[type[StrictModel]]:
    import cluster
    import pipelines
    import sar_scale

    for pkg in (sar_scale, pipelines, cluster):
        for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not m.name.endswith(_SKIP_MODULES):
                importlib.import_module(m.name)

    def subs(c: type) -> list[type]:
        out = []
        for s in c.__subclasses__():
            out += [s, *subs(s)]
        return out

    return sorted({c for c in subs(StrictModel) if not c.__module__.startswith("tests.")},
                  key=lambda c: (c.__module__, c.__name__))


CLASSES = _all_config_classes()
IDS = [f"{c.__module__.rsplit('.', 1)[-1]}.{c.__name__}" for c in CLASSES]
MUST_HAVE = {"TrainConfig", "PrepareConfig", "JobSpec", "ClusterProfile", "FMTConfig", "PlanDistribution",
             "VQConfig", "StageConfig", "ExportConfig"}


def _unwrap(ann: Any) -> Any:
    """``Optional[X]`` / ``X | None`` -> X."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _error(cls: type[BaseModel], data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(cls, data)
    return str(ei.value)


def test_every_config_class_is_covered():
    names = {c.__name__ for c in CLASSES}
    assert MUST_HAVE <= names, MUST_HAVE - names


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_unknown_keys_are_errors_at_every_level(cls, figures):
    """A typo is an error naming the full dotted key, never a silent default - in every nested section too."""
    tried = 0
    msg = _error(cls, {"zz_tpyo": 1})
    assert "unknown key 'zz_tpyo'" in msg, msg
    tried += 1
    for name, f in cls.model_fields.items():
        sub = _unwrap(f.annotation)
        if isinstance(sub, type) and issubclass(sub, StrictModel):
            msg = _error(cls, {name: {"zz_tpyo": 1}})
            assert f"unknown key '{name}.zz_tpyo'" in msg, msg
            tried += 1
    figures.record("6_bad_config", f"unknown_keys/{cls.__name__}", tried=tried, survived=tried, lost=0)


def _literal_fields(cls: type[BaseModel]) -> list[tuple[str, tuple]]:
    out = []
    for name, f in cls.model_fields.items():
        ann = _unwrap(f.annotation)
        if typing.get_origin(ann) is Literal:
            out.append((name, typing.get_args(ann)))
    return out


def _bound_fields(cls: type[BaseModel]) -> list[tuple[str, Any]]:
    """(field, a value just outside its numeric bound)."""
    out = []
    for name, f in cls.model_fields.items():
        for m in f.metadata:
            if isinstance(m, annotated_types.Ge):
                out.append((name, m.ge - 1))
            elif isinstance(m, annotated_types.Gt):
                out.append((name, m.gt - (1 if isinstance(m.gt, int) else 0)))
            elif isinstance(m, annotated_types.Le):
                out.append((name, m.le + 1))
            elif isinstance(m, annotated_types.Lt):
                out.append((name, m.lt))
    return out


@pytest.mark.parametrize("cls", [c for c in CLASSES if _literal_fields(c) or _bound_fields(c)],
                         ids=[i for c, i in zip(CLASSES, IDS) if _literal_fields(c) or _bound_fields(c)])
def test_bad_values_name_the_field_and_the_allowed_values(cls, figures):
    """Every enumerated field: the message names the field, the bad value and each allowed value.
    Every numeric bound (ge/gt/le/lt): the message names the field and the bad value."""
    tried = 0
    for name, allowed in _literal_fields(cls):
        msg = _error(cls, {name: "not-a-choice"})
        line = next((ln for ln in msg.splitlines() if ln.strip().startswith(f"- {name}:")), None)
        assert line is not None, msg
        assert "'not-a-choice'" in line and "allowed:" in line, line
        for a in allowed:
            assert repr(a) in line or str(a) in line, (a, line)
        tried += 1
    for name, bad in _bound_fields(cls):
        msg = _error(cls, {name: bad})
        line = next((ln for ln in msg.splitlines() if ln.strip().startswith(f"- {name}:")), None)
        assert line is not None and repr(bad) in line, (name, bad, msg)
        tried += 1
    figures.record("6_bad_config", f"bad_values/{cls.__name__}", tried=tried, survived=tried, lost=0)


def _train_base(**over: Any) -> dict[str, Any]:
    cfg = {"data": {"url": "shards"}, "curriculum": {"stages": [{"name": "a", "resolution": 64, "steps": 1,
                                                                  "micro_batch": 1}]}}
    cfg.update(over)
    return cfg


CROSS_FIELD: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("training.config", "TrainConfig", {"curriculum": {"stages": [{"name": "a", "resolution": 64, "steps": 1,
                                                                    "micro_batch": 1}]}},
     ["data.url is required", "'a'"]),
    ("training.config", "TrainConfig", _train_base(curriculum={"stages": [
        {"name": "a", "resolution": 64, "steps": 1, "micro_batch": 2, "tokens_per_batch": 64}]}),
     ["curriculum.stages.0", "exactly one of micro_batch or tokens_per_batch"]),
    ("training.config", "TrainConfig", _train_base(curriculum={"stages": [
        {"name": "a", "resolution": 64, "steps": 1, "micro_batch": 1},
        {"name": "a", "resolution": 128, "steps": 1, "micro_batch": 1}]}),
     ["curriculum.stages", "unique"]),
    ("training.config", "TrainConfig", _train_base(data={"url": "s", "cond": "text_encoder"}),
     ["data.text_encoder"]),
    ("training.config", "TrainConfig", _train_base(optim={"betas": [0.9, 1.5]}), ["optim.betas", "[0, 1)"]),
    ("training.config", "TrainConfig", _train_base(plan={"orders": {"spiralz": 1.0}}),
     ["plan.orders", "spiralz", "raster", "random"]),
    ("training.config", "TrainConfig", _train_base(deepspeed={"zero_stage": 4}),
     ["deepspeed.zero_stage", "allowed: 0, 1, 2 or 3"]),
    ("models.config", "FMTConfig", {"width": 100, "heads": 3}, ["width (100) must be divisible by heads (3)"]),
    ("sar.plan", "PlanDistribution", {"intervals": {"linear": 1.0}}, ["intervals", "linear", "cosine"]),
    ("pipelines.config", "PrepareConfig", {"input": {"path": "x"}, "tokenize": {"resolutions": [256, 384]}},
     ["tokenize.resolutions", "384", "multiple"]),
    ("pipelines.config", "PrepareConfig", {}, ["input.path is required"]),
    ("cluster.spec", "JobSpec", {"job_id": "Bad_ID", "backend": "local", "command": ["train"]},
     ["job_id", "Bad_ID", "lowercase"]),
    ("cluster.spec", "JobSpec", {"job_id": "j", "backend": "local", "command": ["trian"]},
     ["command", "'trian'", "train"]),
    ("cluster.spec", "JobSpec", {"job_id": "j", "backend": "lsf", "command": ["train"]},
     ["backend", "'lsf'", "allowed:", "slurm"]),
    ("cluster.spec", "ClusterProfile", {"env": {"AWS_SECRET_ACCESS_KEY": "x"}},
     ["env", "AWS_SECRET_ACCESS_KEY", "secret_env"]),
    ("cluster.spec", "ClusterProfile", {"resources": {"time": "soon"}}, ["resources.time", "soon"]),
]


@pytest.mark.parametrize("mod, cls_name, data, needles", CROSS_FIELD,
                         ids=[f"{c}-{i}" for i, (_, c, _, _) in enumerate(CROSS_FIELD)])
def test_cross_field_rules_name_the_fields(mod, cls_name, data, needles, figures):
    full = mod if mod.startswith(("pipelines", "cluster")) else f"sar_scale.{mod}"
    cls = getattr(importlib.import_module(full), cls_name)
    msg = _error(cls, data)
    for n in needles:
        assert n in msg, (n, msg)
    figures.record("6_bad_config", f"cross_field/{cls_name}/{needles[0]}", tried=1, survived=1, lost=0)


def test_yaml_layering_and_overrides_are_strict_too(tmp_path):
    """A typo in a parent file (``defaults:``) or in a dot-list override is caught like one in the file."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**_train_base(), "optim": {"lr": 1e-3, "warmup_stesp": 2}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"defaults": "base.yaml", "seed": 1}))
    from sar_scale.training.config import TrainConfig

    with pytest.raises(ConfigError, match=r"unknown key 'optim.warmup_stesp'"):
        load_config(TrainConfig, tmp_path / "child.yaml")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(_train_base()))
    with pytest.raises(ConfigError, match=r"unknown key 'deepspeed.zero_stag'"):
        load_config(TrainConfig, tmp_path / "child.yaml", ["deepspeed.zero_stag=2"])
    with pytest.raises(ConfigError, match=r"mlflow.log_every: .*greater than or equal to 1; got 0"):
        load_config(TrainConfig, tmp_path / "child.yaml", ["mlflow.log_every=0"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(TrainConfig, tmp_path / "list.yaml")


def test_clis_fail_fast_naming_the_key(tmp_path, capsys, figures):
    """`train`, `data prepare`, `submit` with a typo'd key exit 2 within seconds, before any heavy start
    (no Ray, no process group, no run folder), and say which key."""
    from cluster.cli import main as submit_main
    from pipelines.prepare import main as prepare_main
    from sar_scale.training.cli import main as train_main

    run_dir = tmp_path / "run"
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(_train_base(run_dir=str(run_dir))))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"input": {"path": str(tmp_path)}}))
    (tmp_path / "prof.yaml").write_text(yaml.safe_dump({"name": "x", "slurm": {"partiton": "gpu"}}))
    cases = [
        (train_main, [str(tmp_path / "t.yaml"), "optim.lrr=1"], "unknown key 'optim.lrr'"),
        (train_main, [str(tmp_path / "t.yaml"), "deepspeed.precision=fp8"], "allowed: 'auto', 'fp32' or 'bf16'"),
        (prepare_main, [str(tmp_path / "p.yaml"), "output.samples_per_shrad=5"],
         "unknown key 'output.samples_per_shrad'"),
        (submit_main, ["--backend", "local", "--profile", str(tmp_path / "prof.yaml"), "--dry-run", "--",
                       "data", "synth"], "unknown key 'slurm.partiton'"),
    ]
    for fn, argv, needle in cases:
        t0 = time.time()
        rc = fn(argv)
        secs = time.time() - t0
        err = capsys.readouterr().err
        assert rc == 2 and needle in err, (argv, rc, err)
        assert secs < 10, (argv, secs)
    assert not run_dir.exists()
    import sys

    import torch.distributed as dist

    assert "ray" not in sys.modules or not __import__("ray").is_initialized()
    assert not dist.is_initialized()
    figures.record("6_bad_config", "cli_fail_fast", tried=len(cases), survived=len(cases), lost=0)


def test_fault_config_itself_is_strict():
    """The fault proxy's own config: rates are probabilities that sum to at most 1."""
    from sar_scale.testing.s3_fault_proxy import FaultConfig

    with pytest.raises(ConfigError, match="sum to 1.200 > 1"):
        load_config(FaultConfig, {"error_500": 0.6, "reset": 0.6})
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FaultConfig.mixed(0.1, kinds=("error_500", "meteor"))
