"""What the first GPU hour must not have to debug: bf16 train steps (flex and SDPA, compiled), NCCL on
one GPU, bf16 cached == recomputed sampling logits, VQ encode in bf16 vs fp32. Skipped without CUDA."""

import pytest
import torch

from sar_scale.models import build_model
from sar_scale.sar import Condition, SetPlan, set_ar_loss

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _text_cond(b, n_text, g, device):
    text = torch.randn(b, n_text, 32, generator=g).to(device)
    return Condition(text=text, text_mask=(torch.rand(b, n_text, generator=g) > 0.2).to(device))


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_train_steps(impl, compiled):
    torch.manual_seed(0)
    m = build_model("debug", cond="text", attn_impl=impl).cuda()
    if compiled:
        m.compile_blocks()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 64, (4, 64), generator=g).cuda()
    cond = _text_cond(4, 7, g, "cuda")
    losses = []
    for step in range(8):
        plan = SetPlan.build((8, 8), order="random", num_sets=8, intervals="random", batch_size=4,
                             generator=torch.Generator().manual_seed(step))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = set_ar_loss(m(tok, cond, plan), tok)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]  # the same batch: it learns


def test_nccl_init_one_gpu():
    from sar_scale.distributed import comm
    from sar_scale.distributed.init import destroy_distributed, init_distributed

    denv = init_distributed("nccl", "cuda", timeout_s=60)
    try:
        assert torch.distributed.get_backend() == "nccl" and denv.world_size == 1
        t = torch.ones(3, device="cuda")
        torch.distributed.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
        assert comm.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    finally:
        destroy_distributed()


@pytest.mark.parametrize("static", [False, True])
def test_bf16_cached_logits_equal_recomputed(static):
    torch.manual_seed(0)
    m = build_model("debug", cond="text").cuda().to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    cond = _text_cond(2, 5, g, "cuda")
    plan = SetPlan.build((8, 8), order="random", num_sets=6, intervals="cosine", batch_size=2, seed=2).to("cuda")
    tok = torch.randint(0, 64, (2, 64), generator=g).cuda()
    seq, pos = torch.gather(tok, 1, plan.order), plan.positions("cuda")
    set_ids = plan.set_ids("cuda")
    cache = m.init_cache(cond, plan.grid, static=static)
    start = 0
    with torch.no_grad():
        for size in plan.set_sizes:
            sl = slice(start, start + size)
            cached = m.decode_next(cache, pos[:, sl]).float()
            recomputed = m.forward_seq(cond, seq[:, :start], pos[:, :start], set_ids[:start], pos[:, sl],
                                       set_ids[sl], plan.grid).float()
            torch.testing.assert_close(cached, recomputed, rtol=0.05, atol=0.05)
            assert (cached.argmax(-1) == recomputed.argmax(-1)).float().mean() > 0.9
            m.extend_cache(cache, seq[:, sl], pos[:, sl])
            start += size


def test_vq_bf16_codes_match_fp32_on_most_tokens():
    from sar_scale.tokenizers.vq import VQConfig, VQModel

    torch.manual_seed(0)
    vq = VQModel(VQConfig.named("demo-small")).cuda().eval()
    img = (torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1).cuda()
    a = vq.encode(img)
    b = vq.encode(img, dtype=torch.bfloat16)
    assert (a == b).float().mean() > 0.9
