"""Fully Masked Transformer: causality (black-box), AR special case, KV cache, any resolution,
named sizes, and an overfit-then-sample-back check."""

import pytest
import torch

from sar_scale.models import MODEL_SIZES, build_model, count_parameters
from sar_scale.sar import Condition, SetPlan, sample, set_ar_loss

torch.set_num_threads(2)


def _model(**kw):
    torch.manual_seed(0)
    return build_model("debug", **kw).eval()


def _cls(b):
    return Condition(class_ids=torch.arange(b) % 10)


PLANS = [
    dict(order="raster", intervals="ar"),
    dict(order="raster", num_sets=4, intervals="equal"),
    dict(order="spiral", num_sets=5, intervals="cosine"),
    dict(order="zigzag", num_sets=3, intervals="random"),
    dict(order="subsample", num_sets=6, intervals="equal"),
    dict(order="fixed_random", num_sets=4, intervals="random"),
    dict(order="random", num_sets=4, intervals="random"),  # per-sample orders (batched)
]


@pytest.mark.parametrize("spec", PLANS, ids=lambda s: f"{s['order']}-{s.get('num_sets', 'N')}-{s['intervals']}")
def test_causality_black_box(spec):
    m = _model()
    grid = (3, 4)
    plan = SetPlan.build(grid, batch_size=2, seed=3, **spec)
    tok = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    cond = _cls(2)
    with torch.no_grad():
        base = m(tok, cond, plan)
    set_of = plan.raster_set_ids()  # [B, N]
    for k in range(plan.num_sets):
        # change every token of sets >= k: logits of sets <= k must not move
        later = set_of >= k
        tok2 = torch.where(later, (tok + 1) % 64, tok)
        with torch.no_grad():
            out = m(tok2, cond, plan)
        upto = (set_of <= k).unsqueeze(-1).expand_as(out)
        torch.testing.assert_close(out[upto], base[upto], rtol=0, atol=1e-5)
        if k > 0:
            # change tokens of earlier sets: logits of set k must move
            earlier = set_of < k
            tok3 = torch.where(earlier, (tok + 7) % 64, tok)
            with torch.no_grad():
                out3 = m(tok3, cond, plan)
            here = (set_of == k).unsqueeze(-1).expand_as(out3)
            assert (out3[here] - base[here]).abs().max() > 1e-4


def test_ar_special_case_is_causal_next_token():
    m = _model()
    plan = SetPlan.build((2, 4), order="raster", intervals="ar")
    tok = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    cond = _cls(1)
    with torch.no_grad():
        base = m(tok, cond, plan)
        for i in range(8):
            t2 = tok.clone()
            t2[0, i:] = (t2[0, i:] + 3) % 64
            out = m(t2, cond, plan)
            torch.testing.assert_close(out[0, : i + 1], base[0, : i + 1], rtol=0, atol=1e-5)  # <= i unchanged
            if i + 1 < 8:
                assert (out[0, i + 1] - base[0, i + 1]).abs().max() > 1e-4  # i+1 depends on token i


@pytest.mark.parametrize("spec", PLANS[:1] + PLANS[2:], ids=lambda s: s["order"] + "-" + s["intervals"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_kv_cache_matches_recompute(spec, cfg):
    m = _model()
    plan = SetPlan.build((3, 4), batch_size=2, seed=2, **spec)
    cond = _cls(2)
    outs = []
    for kv in (True, False):
        g = torch.Generator().manual_seed(7)
        outs.append(sample(m, cond, plan, cfg_scale=cfg, cfg_schedule="linear", kv_cache=kv, generator=g,
                           temperature=1.0, top_k=20, top_p=0.9))
    assert torch.equal(outs[0], outs[1])


def test_cached_logits_equal_full_forward():
    m = _model()
    plan = SetPlan.build((4, 4), order="random", num_sets=5, intervals="random", batch_size=2, seed=4)
    tok = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    cond = _cls(2)
    with torch.no_grad():
        full = m(tok, cond, plan)
    full_seq = torch.gather(full, 1, plan.order.unsqueeze(-1).expand_as(full))
    seq = torch.gather(tok, 1, plan.order)
    pos = plan.positions()
    cache = m.init_cache(cond, plan.grid)
    buffers = [t.data_ptr() for kv in cache.enc + cache.cross for t in kv]
    start = 0
    for size in plan.set_sizes:
        sl = slice(start, start + size)
        logits = m.decode_next(cache, pos[:, sl])
        torch.testing.assert_close(logits, full_seq[:, sl], rtol=1e-4, atol=1e-5)
        m.extend_cache(cache, seq[:, sl], pos[:, sl])
        start += size
    # written in place: the buffers allocated up front are the ones holding every set
    assert [t.data_ptr() for kv in cache.enc + cache.cross for t in kv] == buffers
    assert cache.length == cache.capacity == 1 + 16  # class token + the 4x4 grid
    with pytest.raises(ValueError, match="KV cache holds 17 keys"):
        m.extend_cache(cache, seq[:, :1], pos[:, :1])


def test_text_condition_padding_invariance_and_dropout():
    torch.manual_seed(0)
    m = build_model("debug", cond="text").eval()
    plan = SetPlan.build((2, 3), order="raster", num_sets=3, intervals="equal")
    tok = torch.randint(0, 64, (1, 6))
    text = torch.randn(1, 3, 32)
    a = m(tok, Condition(text=text, text_mask=torch.ones(1, 3, dtype=torch.bool)), plan)
    padded = torch.cat([text, torch.randn(1, 4, 32)], dim=1)
    mask = torch.tensor([[True] * 3 + [False] * 4])
    b = m(tok, Condition(text=padded, text_mask=mask), plan)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    null = Condition(text=text).null_like()
    assert not null.text_mask.any()
    assert torch.isfinite(m(tok, null, plan)).all()
    with pytest.raises(ValueError, match="width"):
        m(tok, Condition(text=torch.randn(1, 3, 5)), plan)
    with pytest.raises(ValueError, match="class_ids"):
        build_model("debug")(tok, Condition(text=text), plan)


def test_kv_cache_takes_the_dtype_of_its_keys():
    m = _model()
    cond = _cls(2)
    assert m.init_cache(cond, (4, 4)).enc[0][0].dtype == torch.float32
    plan = SetPlan.build((4, 4), order="random", num_sets=4, intervals="cosine")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # K/V come out bf16: the buffers must match
        assert m.init_cache(cond, (4, 4)).cross[0][1].dtype == torch.bfloat16
        out = sample(m, cond, plan, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 16)
    assert build_model("debug").to(torch.bfloat16).eval().init_cache(cond, (4, 4)).enc[1][0].dtype == torch.bfloat16


def test_any_resolution_train_one_grid_sample_another():
    torch.manual_seed(0)
    m = build_model("debug", rope_scaling="ntk", rope_train_grid=(3, 5))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for step in range(3):
        for grid in [(3, 5), (5, 3)]:
            plan = SetPlan.build(grid, order="random", num_sets=4, intervals="random", batch_size=2, seed=step)
            tok = torch.randint(0, 64, (2, grid[0] * grid[1]))
            loss = set_ar_loss(m(tok, _cls(2), plan), tok)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for grid in [(4, 7), (6, 6)]:
        out = sample(m, _cls(2), SetPlan.build(grid, order="raster", num_sets=4, intervals="cosine"),
                     generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, grid[0] * grid[1]) and out.max() < 64
    m2 = build_model("debug", rope_scaling="linear", rope_train_grid=(2, 2)).eval()
    assert torch.isfinite(m2(torch.zeros(1, 16, dtype=torch.long), _cls(1),
                             SetPlan.build((4, 4), num_sets=2, intervals="equal"))).all()


def test_fractional_positions_name_the_same_place_in_every_grid():
    from sar_scale.models.layers import frac_positions

    # the right-middle cell of a 4x4, 8x8 and 6x10 grid: same column fraction, same row fraction
    cells = {(4, 4): (1.5, 3), (8, 8): (3.5, 7), (6, 10): (2.5, 9)}
    fr = {g: frac_positions(torch.tensor([[[r, c]]]), g)[0, 0] for g, (r, c) in cells.items()}
    for g in cells:
        torch.testing.assert_close(fr[g][0], fr[(4, 4)][0])
    assert fr[(4, 4)][1] < fr[(8, 8)][1] < fr[(6, 10)][1]  # (c + 0.5) / W: 3.5/4 < 7.5/8 < 9.5/10
    # off by default (older checkpoints keep their exact state dict); on: causal, cached == recomputed
    assert not any("frac" in k for k in _model().state_dict())
    m = _model(frac_pos=True)
    assert "frac_proj.weight" in m.state_dict()
    plan = SetPlan.build((3, 5), order="random", num_sets=4, intervals="random", batch_size=2, seed=1)
    outs = [sample(m, _cls(2), plan, kv_cache=kv, generator=torch.Generator().manual_seed(5)) for kv in (True, False)]
    assert torch.equal(outs[0], outs[1])
    tok = torch.randint(0, 64, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = m(tok, _cls(2), plan)
        m.frac_proj.weight.zero_()  # the fractional term really reaches the logits
        b = m(tok, _cls(2), plan)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("name", list(MODEL_SIZES))
def test_named_sizes_parameter_counts(name):
    lo, hi = MODEL_SIZES[name][1]
    n = count_parameters(name) / 1e6
    assert lo <= n <= hi, f"{name}: {n:.1f}M not in [{lo}, {hi}]"


def test_bad_model_config():
    with pytest.raises(ValueError, match="divisible"):
        build_model("debug", heads=3)
    with pytest.raises(ValueError, match="unknown model size"):
        build_model("fmt-q")


def test_activation_checkpointing_same_grads():
    torch.manual_seed(0)
    m = build_model("debug").train()
    plan = SetPlan.build((2, 4), order="random", num_sets=3, intervals="random", batch_size=2, seed=0)
    tok = torch.randint(0, 64, (2, 8))
    set_ar_loss(m(tok, _cls(2), plan), tok).backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.enable_activation_checkpointing()
    set_ar_loss(m(tok, _cls(2), plan), tok).backward()
    for a, p in zip(g1, m.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_overfit_then_sample_back():
    """A tiny model memorises 4 class-conditional grids (random-order, random-interval training)
    and samples each back exactly with a few-step plan it never trained on."""
    torch.manual_seed(0)
    m = build_model("debug", vocab_size=16, num_classes=4)
    grids = torch.randint(0, 16, (4, 12), generator=torch.Generator().manual_seed(5))
    cond = Condition(class_ids=torch.arange(4))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    from sar_scale.sar import PlanDistribution, PlanSampler

    sampler = PlanSampler(PlanDistribution(orders={"random": 1}, num_sets=[2, 3, 4, 6], intervals={"random": 1}))
    recent = []
    for _ in range(400):  # stops once the last 10 losses are all tiny
        plan = sampler.draw((3, 4), 4, g)
        loss = set_ar_loss(m(grids, cond, plan), grids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-10:]
        if len(recent) == 10 and max(recent) < 0.02:
            break
    assert max(recent) < 0.05
    out = sample(m, cond, SetPlan.build((3, 4), order="raster", num_sets=4, intervals="equal"), temperature=0)
    assert torch.equal(out, grids)


def test_edit_keeps_known_tokens():
    m = _model()
    plan = SetPlan.build((4, 4), order="random", num_sets=4, intervals="cosine", batch_size=2, seed=0)
    known_tokens = torch.randint(0, 64, (2, 16))
    known = torch.zeros(16, dtype=torch.bool)
    known[:8] = True  # top half given: outpaint the bottom
    out = sample(m, _cls(2), plan, known_tokens=known_tokens, known_mask=known,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :8], known_tokens[:, :8])
    out_nc = sample(m, _cls(2), plan, known_tokens=known_tokens, known_mask=known, kv_cache=False,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, out_nc)


def test_sampling_seed_determinism():
    m = _model()
    plan = SetPlan.build((3, 3), order="random", num_sets=3, intervals="random", batch_size=2, seed=0)
    a = sample(m, _cls(2), plan, generator=torch.Generator().manual_seed(1))
    b = sample(m, _cls(2), plan, generator=torch.Generator().manual_seed(1))
    c = sample(m, _cls(2), plan, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flex_attention_matches_sdpa():
    """The flex-attention block-mask path (used on CUDA) gives the SDPA logits (forward, eager CPU)."""
    torch.manual_seed(0)
    sd = build_model("debug", cond="text").eval()
    fx = build_model("debug", cond="text", attn_impl="flex").eval()
    fx.load_state_dict(sd.state_dict())
    plan = SetPlan.build((3, 4), order="random", num_sets=4, intervals="random", batch_size=2, seed=0)
    tok = torch.randint(0, 64, (2, 12))
    cond = Condition(text=torch.randn(2, 5, 32), text_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool())
    with torch.no_grad():
        torch.testing.assert_close(fx(tok, cond, plan), sd(tok, cond, plan), rtol=1e-4, atol=1e-5)
