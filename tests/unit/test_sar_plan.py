"""Orders, intervals, set plans and the three generalized masks."""

import pytest
import torch

from sar_scale.config import ConfigError, load_config
from sar_scale.sar import INTERVALS, ORDERS, PlanDistribution, PlanSampler, SetPlan, make_order, set_sizes


@pytest.mark.parametrize("name", ORDERS)
@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (1, 7), (6, 2)])
def test_orders_are_permutations(name, grid):
    o = make_order(name, *grid, batch_size=3, seed=5)
    assert o.shape[1] == grid[0] * grid[1]
    for row in o:
        assert sorted(row.tolist()) == list(range(grid[0] * grid[1]))


def test_structured_orders():
    assert make_order("zigzag", 2, 3)[0].tolist() == [0, 1, 2, 5, 4, 3]
    assert make_order("spiral", 3, 3)[0].tolist() == [0, 1, 2, 5, 8, 7, 6, 3, 4]
    assert make_order("subsample", 2, 4)[0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    a = make_order("fixed_random", 4, 4, seed=3)
    assert torch.equal(a, make_order("fixed_random", 4, 4, seed=3))
    assert not torch.equal(a, make_order("fixed_random", 4, 4, seed=4))
    r = make_order("random", 4, 4, batch_size=2, seed=0)
    assert not torch.equal(r[0], r[1])


@pytest.mark.parametrize("intervals", INTERVALS)
@pytest.mark.parametrize("n,k", [(16, 4), (256, 16), (7, 7), (10, 1), (1024, 64)])
def test_set_sizes(intervals, n, k):
    s = set_sizes(n, k, intervals, seed=1)
    assert sum(s) == n and min(s) >= 1
    assert len(s) == (n if intervals == "ar" else k)


def test_cosine_grows_and_bad_values():
    s = set_sizes(256, 8, "cosine")
    assert s[0] < s[-1]
    with pytest.raises(ValueError, match="num_sets"):
        set_sizes(10, 11, "equal")
    with pytest.raises(ValueError, match="intervals must be one of"):
        set_sizes(10, 2, "bogus")
    with pytest.raises(ValueError, match="order must be one of"):
        make_order("bogus", 2, 2)


def test_masks_sequence_and_raster():
    plan = SetPlan.build((2, 3), order="random", num_sets=3, intervals="equal", batch_size=2, seed=0)
    m = plan.masks()
    ids = plan.set_ids()
    assert ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert m["encoder"][2].tolist() == [True, True, True, True, False, False]
    assert m["decoder_self"][2].tolist() == [False, False, True, True, False, False]
    assert m["decoder_cross"][2].tolist() == [True, True, False, False, False, False]
    r = plan.masks(space="raster")
    assert r["encoder"].shape == (2, 6, 6)
    # raster mask of sample b = sequence mask permuted by its order
    for b in range(2):
        o = plan.order[b]
        inv = torch.empty_like(o)
        inv[o] = torch.arange(6)
        assert torch.equal(r["decoder_cross"][b], m["decoder_cross"][inv][:, inv])


def test_ar_plan_masks_are_causal():
    plan = SetPlan.build((3, 3), order="raster", intervals="ar")
    m = plan.masks()
    n = 9
    assert torch.equal(m["decoder_cross"], torch.ones(n, n).tril(-1).bool())
    assert torch.equal(m["encoder"], torch.ones(n, n).tril().bool())


def test_with_known_puts_known_first():
    plan = SetPlan.build((4, 4), order="raster", num_sets=4, intervals="equal")
    known = torch.zeros(16, dtype=torch.bool)
    known[[5, 6, 9]] = True
    p2, nk = plan.with_known(known)
    assert nk == 3 and p2.set_sizes[0] == 3 and sum(p2.set_sizes) == 16
    assert p2.order[0, :3].tolist() == [5, 6, 9]
    with pytest.raises(ValueError, match="same number"):
        plan.with_known(torch.stack([known, torch.zeros(16, dtype=torch.bool)]))


def test_plan_sampler_is_deterministic_and_validated():
    dist = PlanDistribution(orders={"random": 1, "raster": 1}, num_sets=[4, 8], intervals={"random": 1, "cosine": 1})
    s = PlanSampler(dist)
    a = [s.draw((4, 4), 2, torch.Generator().manual_seed(i)) for i in range(6)]
    b = [s.draw((4, 4), 2, torch.Generator().manual_seed(i)) for i in range(6)]
    assert all(torch.equal(x.order, y.order) and x.set_sizes == y.set_sizes for x, y in zip(a, b))
    assert len({p.name() for p in a}) > 1
    with pytest.raises(ConfigError, match="orders"):
        load_config(PlanDistribution, {"orders": {"rastr": 1}})
    with pytest.raises(ConfigError, match="unknown key 'num_set'"):
        load_config(PlanDistribution, {"num_set": [4]})


def test_recipe_is_the_one_parser_of_order_k_intervals():
    from typing import get_args

    from sar_scale.sar import Recipe
    from sar_scale.sar.intervals import Intervals
    from sar_scale.sar.orders import Order

    assert ORDERS == get_args(Order) and INTERVALS == get_args(Intervals)
    # one normal form for AR, however it is written
    assert Recipe("raster", None, "cosine") == Recipe("raster", 16, "ar") == Recipe.parse("raster-ar")
    assert Recipe.parse("raster-256-ar").is_ar and Recipe.parse("fixed_random-8-equal").order == "fixed_random"
    assert Recipe.parse("Random-16") == Recipe("random", 16, "cosine")
    assert Recipe("random", 64).name((4, 4)) == "random-16-cosine" and Recipe("raster", None).name() == "raster-N-ar"
    for bad in ("random-0-cosine", "random-x-cosine", "random-16-cosine-x", "diagonal-4"):
        with pytest.raises(ValueError):
            Recipe.parse(bad)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Recipe("random", 2.5)
    # build: per-sample orders only for 'random' with a batch; fixed_random keeps its training seed
    assert Recipe("random", 4).build((4, 4), batch_size=3).order.shape == (3, 16)
    assert Recipe("random", 4).build((4, 4)).order.shape == (1, 16)
    a = Recipe("fixed_random", 4).build((4, 4), seed=1, fixed_order_seed=7)
    b = Recipe("fixed_random", 4).build((4, 4), seed=2, fixed_order_seed=7)
    assert torch.equal(a.order, b.order) and a.meta["seed"] == 7
    ar = Recipe.parse("raster-ar").build((4, 4))
    assert ar.num_sets == 16 and ar.order.tolist() == [list(range(16))]


def test_condition_from_batch_class_text_and_captions_truncated():
    from sar_scale.sar import Condition

    c = Condition.from_batch({"class_ids": [3, -1]})
    assert c.class_ids.tolist() == [3, -1] and c.class_ids.dtype == torch.long
    text, mask = torch.randn(2, 6, 4), torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    c = Condition.from_batch({"text": text, "text_mask": mask}, max_text_len=4, dtype=torch.float64)
    assert c.text.shape == (2, 4, 4) and c.text.dtype == torch.float64 and c.text_mask.tolist()[1] == [1, 1, 0, 0]
    calls = []

    def encode(captions):  # a text encoder longer than the model's context
        calls.append(list(captions))
        return torch.ones(len(captions), 9, 4), torch.ones(len(captions), 9, dtype=torch.bool)

    c = Condition.from_batch({"captions": ("a", "b")}, text_encoder=encode, max_text_len=5)
    assert calls == [["a", "b"]] and c.text.shape == (2, 5, 4) and c.text_mask.shape == (2, 5)
    assert Condition.from_batch({"captions": ["a"]}, text_encoder=encode).text.shape == (1, 9, 4)
    with pytest.raises(ValueError, match="no text encoder"):
        Condition.from_batch({"captions": ["a"]})
    with pytest.raises(ValueError, match="class_ids, text or captions"):
        Condition.from_batch({"tokens": torch.zeros(1, 4)})
