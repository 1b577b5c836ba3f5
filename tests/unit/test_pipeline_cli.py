"""`sar-scale data ...` dispatch and clear errors before any Ray start."""

from __future__ import annotations

import sys

import pytest

from pipelines import cli


def test_dispatch_and_errors(tmp_path, capsys):
    assert cli.main(["--help"]) == 0
    assert "prepare" in capsys.readouterr().out
    assert cli.main(["bogus"]) == 2
    assert cli.main(["prepare", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("input: {path: x}\nfilters: {min_sid: 3}\n")
    assert cli.main(["prepare", str(tmp_path / "c.yaml")]) == 2
    assert "unknown key 'filters.min_sid'" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text(f"input: {{path: {tmp_path}}}\ntokenize: {{vq_path: {tmp_path / 'novq'}}}\n")
    assert cli.main(["prepare", str(tmp_path / "c.yaml")]) == 2
    assert "tokenize.vq_path: not found" in capsys.readouterr().err
    assert cli.main(["prepare", str(tmp_path / "c.yaml"), f"tokenize.vq_path={tmp_path}"]) == 2
    assert "cannot load a VQ" in capsys.readouterr().err
    assert cli.main(["prepare", str(tmp_path / "c.yaml"), "input.path=/no/such/dir"]) == 2
    assert "input.path: not found" in capsys.readouterr().err
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()
    assert cli.main(["synth", "--out", str(tmp_path / "s"), "--n", "2"]) == 0
    assert (tmp_path / "s" / "000001.png").exists()


def test_dashboard_ray_address_and_web_urls_are_rejected_clearly(tmp_path, capsys):
    from pipelines.config import InputConfig
    from pipelines.inputs import iter_units, manifest_events

    (tmp_path / "c.yaml").write_text(f"input: {{path: {tmp_path}}}\n")
    assert cli.main(["prepare", str(tmp_path / "c.yaml"), "--ray-address", "http://head:8265"]) == 2
    assert "dashboard / Jobs API URL" in capsys.readouterr().err
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "caption": "x"}\n{"path": "https://e.com/b.jpg"}\n')
    cfg = InputConfig(kind="manifest", path=str(tmp_path / "m.jsonl"), image_column="path")
    with pytest.raises(ValueError, match=r"m.jsonl#byte34: column 'path' .* http\(s\) URL"):
        for unit in iter_units(cfg):  # what a scan task reads (the driver unwraps its ValueError)
            list(manifest_events(cfg, unit))
    (tmp_path / "m.jsonl").write_text('{"path": "https://e.com/b.jpg"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl#byte0: column 'path' .* http\(s\) URL"):
        list(iter_units(cfg))  # a first row like that fails in the driver, before any task runs
