"""Eval plans, the shapes suite's scoring/reporting, token NLL on real shards, MLflow logging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sar_scale.data import synthetic as syn
from sar_scale.eval.shapes import format_table, run_shapes_suite, shapes_prompts
from sar_scale.sar import Recipe, standard_recipes

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def test_plans_parse_name_build():
    assert Recipe.parse("raster-ar") == Recipe("raster", None, "ar")
    assert Recipe.parse("random-16-cosine") == Recipe("random", 16, "cosine")
    assert Recipe.parse("raster-8") == Recipe("raster", 8, "cosine")
    with pytest.raises(ValueError, match="ORDER-ar or ORDER-K"):
        Recipe.parse("sixteen")
    with pytest.raises(ValueError, match="order must be one of"):
        Recipe("diagonal", 4)
    plans = standard_recipes([16, 8, 16], ["random", "raster"])
    assert [p.name((8, 8)) for p in plans] == ["raster-64-ar", "random-16-cosine", "raster-16-cosine",
                                               "random-8-cosine", "raster-8-cosine"]
    ar = plans[0].build((4, 6), batch_size=3)
    assert ar.num_sets == 24 and ar.order.shape == (1, 24)
    rnd = Recipe("random", 4).build((4, 6), batch_size=3, seed=1)
    assert rnd.order.shape == (3, 24) and rnd.num_sets == 4
    assert not torch.equal(rnd.order[0], rnd.order[1])  # each image its own order


def _render(color: str, shape: str, position: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw exactly the requested object with the generator's own geometry (a perfect 'model')."""
    img = Image.new("RGB", (size, size), (232, 232, 228))
    s = size * syn.OBJECT_FRACTION
    ext = (s / 2, 2 * s / 3 if shape == "triangle" else s / 2, s / 2, s / 3 if shape == "triangle" else s / 2)
    cx, cy = syn._sample_center(rng, position, size, size, ext)
    syn._draw(ImageDraw.Draw(img), shape, syn._shape_bbox(shape, cx, cy, s), syn.COLORS[color])
    return img


def _renderer(color_swap: dict[str, str] | None = None):
    prompts = {p.caption: p for p in shapes_prompts()}
    calls = []

    def generate(captions, plan, seed):
        calls.append((plan, seed, len(captions)))
        rng = np.random.default_rng(seed)
        out = []
        for c in captions:
            p = prompts[c]
            color = (color_swap or {}).get(p.color, p.color)
            out.append(_render(color, p.shape, p.position, 64, rng))
        return out

    return generate, calls


def test_shapes_suite_scores_and_reports(tmp_path):
    prompts = shapes_prompts()
    assert len(prompts) == 75 and len({(p.color, p.shape, p.position) for p in prompts}) == 75
    assert prompts[0].caption == "a red circle on the left"
    gen, calls = _renderer()
    plans = [Recipe("raster", None, "ar"), Recipe("random", 8)]
    res = run_shapes_suite(gen, plans, tmp_path, samples_per_prompt=2, seed=5, grid=(8, 8))
    assert [r.plan for r in res] == ["raster-64-ar", "random-8-cosine"]
    assert all(r.n == 150 and r.accuracy == {"color": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0} for r in res)
    assert [c[1] for c in calls] == [5, 6, 5, 6]  # same seeds across plans
    d = tmp_path / "random-8-cosine"
    assert (d / "grid.png").is_file() and len(list((d / "images").glob("*.png"))) == 150
    assert len((d / "detections.jsonl").read_text().splitlines()) == 150
    table = format_table(res)
    assert "raster-64-ar" in table and "100.0%" in table


def test_shapes_suite_catches_a_wrong_attribute():
    """A 'model' that paints every red object yellow: color accuracy 80%, all-three too; rest perfect."""
    gen, _ = _renderer({"red": "yellow"})
    (r,) = run_shapes_suite(gen, [Recipe("random", 4)], None, grid=(8, 8))
    assert r.accuracy["color"] == pytest.approx(60 / 75) and r.accuracy["all"] == pytest.approx(60 / 75)
    assert r.accuracy["shape"] == 1.0 and r.accuracy["position"] == 1.0
    wrong = [row for row in r.per_prompt if not row["color"]]
    assert all(row["want"]["color"] == "red" and row["got"]["color"] == "yellow" for row in wrong)


def test_token_nll_on_shards_falls_with_training(tmp_path):
    """NLL over real shards = the training loss: ~ln(V) untrained, far lower once the model learns."""
    from sar_scale.eval.nll import format_nll_table, token_nll
    from sar_scale.models import build_model
    from sar_scale.sar import Condition, PlanDistribution, PlanSampler, set_ar_loss
    from sar_scale.training.debug_data import write_debug_shards

    url = str(tmp_path / "shards")
    write_debug_shards(url, num_samples=48, resolutions=(64,), vocab_size=64, noise=0.0)
    torch.manual_seed(0)
    model = build_model("debug")
    plans = [Recipe("raster", None, "ar"), Recipe("random", 4)]

    def cond_fn(batch):
        return Condition(class_ids=batch["class_ids"])

    before = token_nll(model, url, 64, plans, cond_fn, batch_size=16, max_samples=32, cond="class", progress=False)
    assert all(abs(r.nll - math.log(64)) < 0.3 and r.samples == 32 for r in before)
    assert before[0].tokens == before[1].tokens > 0
    # train on the same shards for a few dozen steps
    from sar_scale.eval.nll import eval_batches

    reader, _ = eval_batches(url, 64, 16, None, cond="class")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = PlanSampler(PlanDistribution(orders={"random": 1, "raster": 1}, num_sets=[4, 16], intervals={"random": 1}))
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(150):
        b = reader[step % len(reader)]
        plan = sampler.draw(b["grid"], b["tokens"].shape[0], g)
        loss = set_ar_loss(model(b["tokens"], Condition(class_ids=b["class_ids"]), plan), b["tokens"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = token_nll(model, url, 64, plans, cond_fn, batch_size=16, max_samples=32, cond="class", progress=False)
    assert all(a.nll < 0.5 * b.nll for a, b in zip(after, before))
    assert "bits/tok" in format_nll_table(after, 64)


def test_eval_logger_new_run_and_existing_run(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from sar_scale.eval.tracking import EvalLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    new = EvalLogger(uri, None, "sar-scale-eval", run_name="eval x", tags={"eval.model": "m"})
    new.log_params({"eval.seed": 0})
    new.log_metrics({"eval/shapes/random-16-cosine/all": 0.5})
    new.log_text("table", "eval/shapes/table.txt")
    new.finish()
    c = MlflowClient(uri)
    r = c.get_run(new.run_id)
    assert r.info.status == "FINISHED" and r.data.metrics["eval/shapes/random-16-cosine/all"] == 0.5
    assert r.data.params["eval.seed"] == "0" and r.data.tags["eval.model"] == "m"
    # the experiment opens in MLflow 3's model-training view, not its GenAI one
    assert c.get_experiment(r.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # a finished training run gets the metrics and artifacts and stays FINISHED
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as train_run:
        mlflow.log_metric("loss", 1.0)
    into = EvalLogger(uri, train_run.info.run_id)
    assert not into.created
    into.log_metrics({"eval/nll/raster-64-ar": 2.0})
    into.log_dict({"a": 1}, "eval/nll/results.json")
    into.finish()
    r = c.get_run(train_run.info.run_id)
    assert r.info.status == "FINISHED" and r.data.metrics["eval/nll/raster-64-ar"] == 2.0
    assert [f.path for f in c.list_artifacts(r.info.run_id, "eval/nll")] == ["eval/nll/results.json"]
    # an id from another store: a new run, not an error
    other = EvalLogger(uri, "0" * 32)
    assert other.created and other.run_id != "0" * 32
