"""SGE, the region enhancement and the mask-aware BatchNorm against naive float64 references."""
import pytest
import torch
import torch.nn.functional as F

from user_dist.models.gse import SGE, MaskedBatchNorm, enhance


def _regions(B=4, R=6, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, R, D, generator=g, dtype=torch.float64)
    mask = torch.rand(B, R, generator=g) > 0.4
    mask[:, 0] = True
    return x, mask


def naive_bn(rows: torch.Tensor, weight, bias, eps=1e-5):
    """BatchNorm of each column over the given rows (N, C)."""
    mean = rows.mean(0)
    var = ((rows - mean) ** 2).mean(0)
    return (rows - mean) / torch.sqrt(var + eps) * weight + bias


def _norm_and_reference():
    """A MaskedBatchNorm(5) with a random affine part and BatchNorm1d(5) with the same state, float64."""
    norm = MaskedBatchNorm(5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    ref = torch.nn.BatchNorm1d(5).double()
    ref.load_state_dict(norm.state_dict())
    return norm, ref


def test_masked_batchnorm_uses_only_real_rows_like_batchnorm1d_on_them():
    x, mask = _regions()
    norm, ref = _norm_and_reference()
    out = norm(x, mask)
    torch.testing.assert_close(out[mask], ref(x[mask]))
    torch.testing.assert_close(norm.running_mean, ref.running_mean)
    torch.testing.assert_close(norm.running_var, ref.running_var)  # unbiased, momentum 0.1
    norm.eval(), ref.eval()
    torch.testing.assert_close(norm(x, mask), ref(x.reshape(-1, 5)).reshape(x.shape))


def test_masked_batchnorm_gradients_match_batchnorm1d_on_the_real_rows():
    x, mask = _regions()
    norm, ref = _norm_and_reference()
    a, b = x.clone().requires_grad_(), x[mask].clone().requires_grad_()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (norm(a, mask) * w)[mask].sum().backward()
    (ref(b) * w[mask]).sum().backward()
    torch.testing.assert_close(a.grad[mask], b.grad)  # through the batch mean and variance too
    torch.testing.assert_close(norm.weight.grad, ref.weight.grad)
    torch.testing.assert_close(norm.bias.grad, ref.bias.grad)


def test_masked_batchnorm_ignores_the_values_of_padded_rows():
    x, mask = _regions()
    norm = MaskedBatchNorm(5).double()
    garbage = x.masked_fill(~mask[..., None], 1e6)
    torch.testing.assert_close(norm(garbage, mask)[mask], norm(x, mask)[mask])


def test_masked_batchnorm_running_statistics_skip_a_non_finite_batch():
    x, mask = _regions()
    norm = MaskedBatchNorm(5).double()
    ref = torch.nn.BatchNorm1d(5).double()
    norm(x, mask), ref(x[mask])
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    for bad in (float("nan"), float("inf")):
        poisoned = x.clone()
        poisoned[0, 0, 2] = bad  # a real row
        assert not torch.isfinite(norm(poisoned, mask)).all()
        for k, v in norm.state_dict().items():
            assert torch.equal(v, state[k]), k  # bit for bit, num_batches_tracked included
    # The next finite batch updates them as BatchNorm1d does, as if the bad ones never came.
    x2, mask2 = _regions(seed=1)
    norm(x2, mask2), ref(x2[mask2])
    torch.testing.assert_close(norm.running_mean, ref.running_mean)
    torch.testing.assert_close(norm.running_var, ref.running_var)
    assert int(norm.num_batches_tracked) == int(ref.num_batches_tracked) == 2


def test_paper_batchnorm_reproduces_batchnorm1d_36_over_region_slots():
    torch.manual_seed(0)
    sge = SGE(8, dropout=0.0, enhance_lambda=1.0, sync_norm=True, paper_regions=36).double()
    ref = torch.nn.BatchNorm1d(36).double()
    with torch.no_grad():
        sge.local_norm.weight.uniform_(0.5, 2)
        sge.local_norm.bias.uniform_(-1, 1)
        ref.weight.copy_(sge.local_norm.weight)
        ref.bias.copy_(sge.local_norm.bias)
    h = torch.randn(3, 36, 8, dtype=torch.float64)
    mask = torch.ones(3, 36, dtype=torch.bool)
    torch.testing.assert_close(sge._local(h, mask), ref(h))
    torch.testing.assert_close(sge.local_norm.running_mean, ref.running_mean)
    torch.testing.assert_close(sge.local_norm.running_var, ref.running_var)
    sge.eval(), ref.eval()
    torch.testing.assert_close(sge._local(h, mask), ref(h))


def test_paper_batchnorm_refuses_another_region_count():
    sge = SGE(8, dropout=0.0, enhance_lambda=1.0, sync_norm=True, paper_regions=36)
    with pytest.raises(ValueError, match="paper_batchnorm needs exactly 36"):
        sge(torch.randn(2, 10, 8), torch.ones(2, 10, dtype=torch.bool))


def naive_enhance(x, guide, mask, lam):
    out = x.clone()
    for b in range(x.shape[0]):
        real = mask[b].nonzero().flatten()
        a = torch.softmax(lam * (x[b, real] @ guide[b]), 0)
        a = a / a.norm()
        out[b, real] = x[b, real] + a[:, None] * guide[b]
    return out


def test_enhancement_matches_the_formula():
    x, mask = _regions()
    guide = F.normalize(torch.randn(4, 5, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(enhance(x, guide, mask, 2.0), naive_enhance(x, guide, mask, 2.0))


def test_sge_matches_a_naive_float64_reference():
    torch.manual_seed(0)
    sge = SGE(5, dropout=0.0, enhance_lambda=1.5, sync_norm=True).double()
    x, mask = _regions()
    got = sge(x, mask)
    want = torch.empty_like(x)
    real_rows = x[mask]  # (N, D): the regions that exist
    local_all = torch.tanh(naive_bn(sge.local_fc(real_rows), sge.local_norm.weight, sge.local_norm.bias))
    g0 = torch.stack([x[b][mask[b]].mean(0) for b in range(4)])
    glob = torch.tanh(naive_bn(sge.global_fc(g0), sge.global_norm.weight, sge.global_norm.bias))
    start = 0
    guides = []
    for b in range(4):
        k = int(mask[b].sum())
        local = local_all[start:start + k]
        start += k
        w = torch.softmax(sge.common(local * glob[b]).squeeze(-1), 0)
        g_hat = (w[:, None] * x[b][mask[b]]).sum(0)
        guides.append(g_hat / g_hat.norm())
    want = naive_enhance(x, torch.stack(guides), mask, 1.5)
    torch.testing.assert_close(got[mask], want[mask])


def test_sge_leaves_padded_regions_unchanged():
    torch.manual_seed(0)
    sge = SGE(5, dropout=0.0, enhance_lambda=1.0, sync_norm=True).double()
    x, mask = _regions()
    torch.testing.assert_close(sge(x, mask)[~mask], x[~mask])
