"""Compiled blocks: static shapes per bucket (zero recompiles inside a bucket, at most one compile per
new bucket), compiled == eager logits (SDPA, flex), cached == recomputed sampling under compile.

Recompile counting uses dynamo's counters, which do not depend on the backend: those tests compile with
``aot_eager`` (dynamo + AOT autograd, no C++ code generation), the numerics tests with inductor,
forward only, on the debug model (inductor's first compile costs minutes on 2 busy cores; its FX graph
cache makes later runs seconds).
"""

import pytest
import torch
from torch._dynamo.utils import counters

from sar_scale.models import build_model
from sar_scale.sar import Condition, PlanDistribution, PlanSampler, SetPlan, sample, set_ar_loss

torch.set_num_threads(2)


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _text_batch(b, grid, g, max_len=16):
    n = grid[0] * grid[1]
    tok = torch.randint(0, 64, (b, n), generator=g)
    length = int(torch.randint(1, max_len + 1, (1,), generator=g))  # a new text length every batch
    cond = Condition(text=torch.randn(b, length, 32, generator=g), text_mask=torch.rand(b, length, generator=g) > 0.3)
    return tok, cond


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_training_steps_within_a_bucket_never_recompile_and_a_bucket_compiles_once():
    torch.manual_seed(0)
    eager = build_model("debug", cond="text")
    comp = build_model("debug", cond="text")
    comp.load_state_dict(eager.state_dict())
    comp.compile_blocks(backend="aot_eager")
    assert [k for k in comp.state_dict()] == [k for k in eager.state_dict()]  # checkpoints unchanged
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, comp)]
    sampler = PlanSampler(PlanDistribution(orders={"random": 1, "raster": 1}, num_sets=[2, 3, 5],
                                           intervals={"random": 1, "cosine": 1}))

    def step(grid, seed):
        losses = []
        for m, opt in zip((eager, comp), opts):
            g = torch.Generator().manual_seed(seed)
            tok, cond = _text_batch(2, grid, g)
            loss = set_ar_loss(m(tok, cond, sampler.draw(grid, 2, g)), tok)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)  # the same training run

    step((4, 4), 0)  # warm-up: one graph per block kind (encoder, decoder)
    warm = _graphs()
    assert warm == 2
    with torch._dynamo.config.patch(error_on_recompile=True):  # random plans, sizes, text lengths
        for s in range(1, 7):
            step((4, 4), s)
        step((2, 8), 7)  # another bucket with the same token count shares the graphs
    assert _graphs() == warm
    step((3, 6), 8)  # a new token count compiles once (each block kind)...
    after_new = _graphs()
    assert after_new - warm <= 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        step((3, 6), 9)  # ... and not again
        step((4, 4), 10)  # nor when coming back to the first bucket


def test_activation_checkpointing_with_compiled_blocks_same_grads():
    torch.manual_seed(0)
    ref = build_model("debug")
    comp = build_model("debug")
    comp.load_state_dict(ref.state_dict())
    comp.compile_blocks(backend="aot_eager")
    comp.enable_activation_checkpointing()
    plan = SetPlan.build((4, 4), order="random", num_sets=4, intervals="random", batch_size=2, seed=1)
    tok = torch.randint(0, 64, (2, 16))
    cond = Condition(class_ids=torch.tensor([1, 2]))
    for m in (ref, comp):
        set_ar_loss(m(tok, cond, plan), tok).backward()
    for (name, a), b in zip(ref.named_parameters(), comp.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_compiled_logits_equal_eager_inductor(impl):
    torch.manual_seed(0)
    eager = build_model("debug", cond="text", attn_impl=impl).eval()
    comp = build_model("debug", cond="text", attn_impl=impl).eval()
    comp.load_state_dict(eager.state_dict())
    comp.compile_blocks()
    g = torch.Generator().manual_seed(1)
    inputs = []
    for seed in range(2):
        tok, cond = _text_batch(2, (3, 4), g)
        inputs.append((tok, cond, SetPlan.build((3, 4), order="random", num_sets=4, intervals="random",
                                                batch_size=2, seed=seed)))
    with torch.no_grad():
        ref = [eager(*x) for x in inputs]
        counters.clear()  # eager flex runs through dynamo's eager backend too: count the blocks' graphs only
        for x, r in zip(inputs, ref):
            torch.testing.assert_close(comp(*x), r, rtol=1e-4, atol=1e-5)
    assert _graphs() == 2  # the second plan (and text length) reused the graphs


def test_static_cache_logits_equal_growing_cache():
    """The static KV cache (whole buffer, unwritten keys masked, index writes) gives the eager cache's
    logits; in eager mode too, so the compiled sampler's math is checked without compiling."""
    torch.manual_seed(0)
    m = build_model("debug", cond="text").eval()
    g = torch.Generator().manual_seed(0)
    _, cond = _text_batch(2, (4, 4), g)
    plan = SetPlan.build((4, 4), order="random", num_sets=5, intervals="cosine", batch_size=2, seed=3)
    tok = torch.randint(0, 64, (2, 16), generator=g)
    seq, pos = torch.gather(tok, 1, plan.order), plan.positions()
    caches = [m.init_cache(cond, plan.grid, static=s) for s in (False, True)]
    assert caches[1].static and not caches[0].static
    start = 0
    for size in plan.set_sizes:
        sl = slice(start, start + size)
        a, b = (m.decode_next(c, pos[:, sl]) for c in caches)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        for c in caches:
            m.extend_cache(c, seq[:, sl], pos[:, sl])
        start += size


@pytest.mark.slow
def test_compiled_sampling_cached_equals_recomputed_and_eager():
    torch.manual_seed(0)
    eager = build_model("debug").eval()
    comp = build_model("debug").eval()
    comp.load_state_dict(eager.state_dict())
    comp.compile_blocks()
    cond = Condition(class_ids=torch.tensor([3, 5]))
    plan = SetPlan.build((4, 4), order="random", num_sets=5, intervals="cosine", batch_size=2, seed=1)
    outs = {}
    for name, m, kv in (("comp_kv", comp, True), ("comp_nokv", comp, False), ("eager_kv", eager, True)):
        outs[name] = sample(m, cond, plan, cfg_scale=2.0, kv_cache=kv, generator=torch.Generator().manual_seed(3))
    assert torch.equal(outs["comp_kv"], outs["comp_nokv"])
    assert torch.equal(outs["comp_kv"], outs["eager_kv"])
    graphs = _graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):  # another plan, same grid: no new graph
        plan2 = SetPlan.build((4, 4), order="random", num_sets=5, intervals="cosine", batch_size=2, seed=2)
        sample(comp, cond, plan2, cfg_scale=2.0, generator=torch.Generator().manual_seed(4))
    assert _graphs() == graphs
