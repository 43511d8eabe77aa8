"""GPO against a straightforward per-sample implementation of VSE-infinity's pooling."""
import math

import torch

from user_dist.models.gpo import GPO, positional_encoding


def loop_gpo(gpo: GPO, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One sample at a time: its real rows, its own positional encodings,
    the GRU on the unpadded sequence, directions averaged, softmax(score/0.1),
    each feature sorted descending, weighted sum."""
    out = []
    for x, m in zip(features, mask):
        x = x[m]  # (k, D)
        k = x.shape[0]
        pe = torch.zeros(k, gpo.pe_dim, dtype=x.dtype)
        for pos in range(k):
            for i in range(0, gpo.pe_dim, 2):
                angle = pos / (10000 ** (i / gpo.pe_dim))
                pe[pos, i] = math.sin(angle)
                pe[pos, i + 1] = math.cos(angle)
        h = gpo.gru(pe[None])[0][0]  # (k, 2*hidden)
        h = (h[:, : h.shape[1] // 2] + h[:, h.shape[1] // 2:]) / 2
        w = torch.softmax(gpo.score(h).squeeze(-1) / 0.1, dim=0)  # (k,)
        out.append((x.sort(dim=0, descending=True).values * w[:, None]).sum(0))
    return torch.stack(out)


def _inputs(B=5, L=7, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) > 0.4
    mask[:, 2] = True  # every sample has at least one element; padding is scattered, not only at the end
    mask[0] = True  # one full-length sample
    return features, mask


def test_positional_encoding_matches_the_sinusoid_definition():
    pe = positional_encoding(5, 8, dtype=torch.float64)
    assert math.isclose(pe[3, 2], math.sin(3 / 10000 ** (2 / 8)), rel_tol=1e-6)
    assert math.isclose(pe[3, 5], math.cos(3 / 10000 ** (4 / 8)), rel_tol=1e-6)


def test_gpo_matches_the_per_sample_loop_values_and_gradients():
    torch.manual_seed(0)
    gpo = GPO(pe_dim=8, hidden=6).double()
    features, mask = _inputs()
    x1, x2 = features.clone().requires_grad_(), features.clone().requires_grad_()
    fast, slow = gpo(x1, mask), loop_gpo(gpo, x2, mask)
    torch.testing.assert_close(fast, slow)
    weights = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * weights).sum(), [x1, *gpo.parameters()])
    g_slow = torch.autograd.grad((slow * weights).sum(), [x2, *gpo.parameters()])
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)


def test_extra_padding_does_not_change_the_pooled_vector():
    torch.manual_seed(0)
    gpo = GPO(pe_dim=8, hidden=6).double()
    features, mask = _inputs()
    padded = torch.cat([features, torch.randn(5, 4, 6, dtype=torch.float64) * 100], 1)
    padded_mask = torch.cat([mask, torch.zeros(5, 4, dtype=torch.bool)], 1)
    torch.testing.assert_close(gpo(padded, padded_mask), gpo(features, mask))


def test_pooling_weights_depend_only_on_the_length():
    torch.manual_seed(0)
    gpo = GPO(pe_dim=8, hidden=6).double()
    table = gpo.weights_by_length(7)  # (7, 7)
    torch.testing.assert_close(table.sum(1), torch.ones(7, dtype=torch.float64))
    assert torch.all(table.triu(1) == 0)  # a set of length k puts no weight past position k
    torch.testing.assert_close(gpo.weights_by_length(3), table[:3, :3])


def test_length_inputs_built_once_serve_training_after_inference_mode():
    torch.manual_seed(0)
    gpo = GPO(pe_dim=8, hidden=6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.inference_mode():  # the cached GRU inputs are built here first
        gpo(torch.randn(2, 5, 3), mask)
    x = torch.randn(2, 5, 3, requires_grad=True)
    gpo(x, mask).sum().backward()
    assert x.grad is not None and gpo.gru.weight_hh_l0.grad is not None
    assert len(gpo._inputs) == 1  # one length, one device, one dtype: built once
