"""Each structured layer equals its dense equivalent, passes gradcheck, and keeps its promises."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch

from compressor.layers import ACDC, ACDCStack, AdaptiveFastfood, HadamardHead, OrthogonalHead, count_stored


def _dct(n: int) -> torch.Tensor:
    return torch.from_numpy(scipy.fft.dct(np.eye(n), norm="ortho", axis=0))


def _hadamard(n: int) -> torch.Tensor:
    return torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64)) / np.sqrt(n)


def test_acdc_layer_is_its_formula(transform_path):
    n = 18
    layer = ACDC(n).double()
    with torch.no_grad():
        layer.bias.normal_()
    c = _dct(n)
    weight = c.T @ torch.diag(layer.d.detach()) @ c @ torch.diag(layer.a.detach())
    bias = c.T @ layer.bias.detach()
    x = torch.randn(7, n, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ weight.T + bias, atol=1e-12)
    dense = layer.dense_equivalent()
    assert torch.allclose(dense.weight, weight, atol=1e-12)


@pytest.mark.parametrize("shape", [(20, 30, 3), (30, 20, 1), (64, 512, 2), (100, 100, 4)])
def test_acdc_stack_equals_dense_equivalent(shape, transform_path):
    stack = ACDCStack(*shape, relu=False).double()
    x = torch.randn(5, shape[0], dtype=torch.float64)
    dense = stack.dense_equivalent()
    assert torch.allclose(stack(x), dense(x), atol=1e-10)


@pytest.mark.parametrize("shape", [(24, 24, 3), (20, 30, 2), (30, 20, 4)])
def test_acdc_stack_with_relu_composes_layers_permutations_and_relu(shape, transform_path):
    """The stack folds its gathers into the permutations; layer by layer it must be the same function."""
    stack = ACDCStack(*shape, seed=3).double()
    x = torch.randn(4, shape[0], dtype=torch.float64)
    expected = torch.nn.functional.pad(x, (0, stack.size - shape[0]))
    for k, layer in enumerate(stack.layers):
        expected = layer.dense_equivalent()(expected)
        if k < shape[2] - 1:
            expected = torch.relu(expected)[:, stack.permutations[k]]
    assert torch.allclose(stack(x), expected[:, : shape[1]], atol=1e-10)
    with pytest.raises(ValueError):
        stack.dense_equivalent()


def test_acdc_initialisation_and_reload():
    stack = ACDCStack(64, 64, 3, sigma=0.05, seed=1)
    a = torch.cat([layer.a.detach() for layer in stack.layers])
    assert abs(float(a.mean()) - 1) < 0.02 and 0.03 < float(a.std()) < 0.07
    clone = ACDCStack(64, 64, 3, seed=2)
    clone.load_state_dict(stack.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(clone(x), stack(x))  # permutations travel in the state_dict
    state = torch.get_rng_state()
    ACDCStack(64, 64, 3, seed=5)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def _kronecker_hadamard(n: int) -> torch.Tensor:
    """Independent construction of fixclf's Fastfood transform for n = q 2^k: DCT-II_q (x) H_(2^k), from scipy."""
    q = n // (n & -n)
    dct = scipy.fft.dct(np.eye(q), axis=0, norm="ortho")
    h = scipy.linalg.hadamard(n // q) / np.sqrt(n // q)
    return torch.from_numpy(np.kron(dct, h))


@pytest.mark.parametrize("features, size", [((12, 40), 12), ((16, 40), 16), ((300, 700), 320), ((17, 5), 18)])
def test_fastfood_is_its_formula(features, size):
    """12 and 16 work at their own size (3 x 4, 2^4), 300 pads to 320 = 5 x 64, 17 to 18 = 9 x 2;
    more outputs than the size stack blocks."""
    layer = AdaptiveFastfood(*features, seed=4).double()
    with torch.no_grad():
        layer.S.normal_()
        layer.bias.normal_()
    n, blocks_count = layer.size, layer.blocks
    assert n == size and blocks_count == -(-features[1] // n)
    h = _kronecker_hadamard(n)
    blocks = []
    perm = layer.permutation.reshape(blocks_count, n) - torch.arange(blocks_count)[:, None] * n
    for j in range(blocks_count):
        pi = torch.eye(n, dtype=torch.float64)[perm[j]]
        b, g, s = (torch.diag(p[j].detach()) for p in (layer.B, layer.G, layer.S))
        blocks.append(s @ h @ g @ pi @ h @ b)
    weight = torch.cat(blocks)[: features[1], : features[0]]
    x = torch.randn(6, features[0], dtype=torch.float64)
    assert torch.allclose(layer(x), x @ weight.T + layer.bias.detach(), atol=1e-12)
    assert torch.allclose(layer.dense_equivalent().weight, weight, atol=1e-12)


def _sylvester_rows(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Entries of Sylvester's Hadamard matrix by its closed form H[i, j] = (-1)^popcount(i & j)."""
    both = rows[:, None] & columns[None, :]
    parity = np.zeros_like(both)
    for bit in range(int(max(rows.max(initial=0), columns.max(initial=0))).bit_length()):
        parity ^= (both >> bit) & 1
    return 1.0 - 2.0 * parity


def test_the_closed_form_reference_is_scipys_hadamard_matrix():
    every = np.arange(256)
    assert np.array_equal(_sylvester_rows(every, every), scipy.linalg.hadamard(256))


def _sylvester_codes(head: HadamardHead) -> torch.Tensor:
    """Independent construction of the head's code matrix: rows 1..C of the order-p Sylvester
    Hadamard matrix (scipy's, by the test above), only the C x N entries used (order 16384 in full
    would be 2 GiB)."""
    n, c = head.in_features, head.num_classes
    columns = torch.arange(n) if head.placement is None else torch.argsort(head.placement)[:n]
    assert head.size & (head.size - 1) == 0 and int(columns.max()) < head.size
    return torch.from_numpy(_sylvester_rows(np.arange(1, c + 1), columns.numpy())) / np.sqrt(n)


@pytest.mark.parametrize("n, c", [(64, 10), (4096, 1000), (84, 10), (100, 120), (10, 100), (9216, 1000)])
def test_hadamard_head_equals_dense_formula(n, c):
    head = HadamardHead(n, c, seed=2).double()
    with torch.no_grad():
        head.set_alpha(3.5)
        head.bias.normal_()
    q = _sylvester_codes(head)
    x = torch.randn(4, n, dtype=torch.float64) * 7
    expected = 3.5 * (x / (x.norm(dim=1, keepdim=True) + head.eps)) @ q.T + head.bias.detach()
    assert torch.allclose(head(x), expected, atol=1e-9)
    assert torch.unique(q, dim=0).shape[0] == c  # no two classes share a code row
    assert torch.allclose(q.norm(dim=1), torch.ones(c, dtype=torch.float64))


def test_hadamard_head_stores_nothing_big():
    head = HadamardHead(4096, 1000)
    assert sorted(name for name, _ in head.named_parameters()) == ["bias", "log_alpha"]
    assert all(t.numel() < 1000 * 4096 / 4 for t in head.state_dict().values())
    assert head.coherence() < 1e-6  # N = 4096, C = 1000: exactly orthogonal codes


def test_the_heads_scale_grows_by_relative_steps():
    """alpha is learned as log(alpha): Adam's step of about lr is then a relative change, so a head
    that must sharpen grows alpha geometrically. Learned directly, alpha would move about lr per
    step: at most 1 + 100 * 0.02 = 3 after 100 steps at lr 0.02."""
    head = HadamardHead(128, 100, bias=False)  # orthogonal codes: nothing but alpha to learn
    head.set_alpha(1.0)
    codes = head.code_matrix()  # features on their class's code row: only a larger alpha lowers the loss
    labels = torch.arange(100)
    optimiser = torch.optim.Adam(head.parameters(), lr=0.02)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(head(codes), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(head.alpha) > 6


def test_a_learned_alpha_must_start_positive():
    with pytest.raises(ValueError, match="must start positive"):
        HadamardHead(8, 3, alpha=0.0)
    assert float(HadamardHead(8, 3, alpha=0.0, learn_alpha=False).alpha) == 0.0


def test_hadamard_head_is_fair_to_non_negative_features():
    head = HadamardHead(256, 10, seed=0)
    with torch.no_grad():
        head.bias.zero_()
    x = torch.relu(torch.randn(20000, 256, generator=torch.Generator().manual_seed(0)))
    wins = torch.bincount(head(x).argmax(1), minlength=10).float() / x.shape[0]
    assert wins.max() < 0.2  # plain truncation gives class 0 every sample


def test_fixed_alpha_and_per_sample_normalisation():
    head = HadamardHead(32, 5, learn_alpha=False, alpha=2.0)
    assert [n for n, _ in head.named_parameters()] == ["bias"]
    x = torch.randn(3, 32)
    batch = head(x)
    assert torch.allclose(batch[1], head(x[1:2])[0], atol=1e-6)  # per sample, not per batch
    assert torch.allclose(head(5 * x), batch, atol=1e-5)


def test_orthogonal_head():
    head = OrthogonalHead(64, 10, seed=1)
    q = head.weight
    assert torch.allclose(q @ q.T, torch.eye(10), atol=1e-5)
    assert torch.equal(OrthogonalHead(64, 10, seed=1).weight, q)
    wide = OrthogonalHead(8, 20)
    assert torch.allclose(wide.weight.norm(dim=1), torch.ones(20), atol=1e-5)


GRADCHECK_MODULES = {
    "acdc": lambda: ACDC(10),
    "acdc_stack": lambda: ACDCStack(12, 20, 3),
    "fastfood": lambda: AdaptiveFastfood(12, 20),
    "hadamard_head": lambda: HadamardHead(12, 20),
    "orthogonal_head": lambda: OrthogonalHead(12, 5),
}


@pytest.mark.parametrize("name", GRADCHECK_MODULES)
def test_gradcheck_float64(name, transform_path):
    module = GRADCHECK_MODULES[name]().double()
    x = torch.randn(3, module.in_features, dtype=torch.float64, requires_grad=True)
    params = tuple(p for p in module.parameters())

    def f(x, *ps):
        for p, value in zip(params, ps):
            p.data = value.data
        return module(x)

    assert torch.autograd.gradcheck(lambda x: module(x), (x,))
    # gradients with respect to every parameter, through torch.func
    names = [n for n, _ in module.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(
        lambda *v: torch.func.functional_call(module, dict(zip(names, v)), (x.detach(),)), values
    )


@pytest.mark.parametrize("build", [lambda: AdaptiveFastfood(96, 96), lambda: ACDCStack(64, 48), lambda: HadamardHead(64, 10)])
def test_layers_build_on_meta_before_and_after_cpu(build):
    """Checkpoint loading builds each planned layer on the meta device first (shapes only); the cached
    transform constants must stay CPU tensors either way round, and the real layer must still compute."""
    with torch.device("meta"):
        build()
    layer = build()
    with torch.device("meta"):
        build()
    assert torch.isfinite(layer(torch.randn(3, layer.in_features))).all()


def test_traced_acdc_runs_the_matmul_chain_and_reduced_precision_runs_eager():
    """torch.jit.trace (and the TorchScript ONNX exporter) must record the exportable chain, never torch.fft;
    a bfloat16 / float16 module still runs eagerly (the FFT path works in float32 at least)."""
    stack = ACDCStack(30, 10, seed=2).eval()
    x = torch.randn(4, 30)
    traced = torch.jit.trace(stack, x)
    assert "fft" not in str(traced.graph) and torch.allclose(traced(x), stack(x), atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        low = copy.deepcopy(stack).to(dtype)
        assert torch.allclose(low(x.to(dtype)).float(), stack(x), atol=0.1), dtype


def test_parameter_counts():
    assert count_stored(ACDCStack(4096, 4096, 2)) == 2 * 3 * 4096 + 4096
    assert count_stored(AdaptiveFastfood(4096, 4096)) == 3 * 4096 + 4096 + 4096
    assert count_stored(HadamardHead(4096, 1000)) == 1 + 1000


EVERY_KIND = [lambda: ACDCStack(30, 20), lambda: ACDC(24), lambda: AdaptiveFastfood(30, 20), lambda: HadamardHead(30, 5),
              lambda: OrthogonalHead(30, 5)]


@pytest.mark.parametrize("build", EVERY_KIND)
def test_zero_rows_and_zero_tokens_give_empty_outputs_with_gradients(build):
    """An empty last batch, or a sequence of no tokens, goes through like any other (torch.fft refuses
    zero rows, so ACDC takes its MatMul chain there)."""
    layer = build()
    for shape in ((0, layer.in_features), (2, 0, layer.in_features)):
        x = torch.randn(*shape, requires_grad=True)
        y = layer(x)
        out = layer.out_features if hasattr(layer, "out_features") else layer.num_classes
        assert y.shape == (*shape[:-1], out)
        y.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("build", EVERY_KIND)
def test_built_on_meta_then_to_empty_and_loaded_computes_as_the_original(build):
    """The usual way to build a big model without memory: on the meta device, then ``to_empty`` (every
    buffer uninitialised) and the state_dict; the transforms' constants and indices are not in the
    state_dict, so the layer must restore them itself."""
    torch.manual_seed(0)
    reference = build()
    with torch.device("meta"):
        layer = build()
    layer = layer.to_empty(device="cpu")
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(4, reference.in_features)
    assert torch.equal(layer(x), reference(x))


@pytest.mark.parametrize("build", EVERY_KIND)
def test_inputs_an_nn_linear_would_refuse_are_refused_by_name(build):
    """Integer inputs (ACDC's FFT path rounded them back to integers, its MatMul chain did not) and a
    last axis other than in_features (a reshape error before) are refused as nn.Linear refuses them."""
    layer = build()
    with pytest.raises(TypeError, match="floating-point inputs, got torch.int64"):
        layer(torch.ones(2, layer.in_features, dtype=torch.long))
    for shape in ((2, layer.in_features + 1), ()):
        with pytest.raises(ValueError, match=rf"takes inputs \(\.\.\., {layer.in_features}\), got shape"):
            layer(torch.ones(shape))


@pytest.mark.parametrize("build, named", [(lambda: ACDCStack(0, 10), "in_features"), (lambda: ACDCStack(3, 5, depth=2.5), "depth"),
                                          (lambda: ACDC(0), "features"), (lambda: AdaptiveFastfood(5, 0), "out_features"),
                                          (lambda: HadamardHead(16, 0), "num_classes"), (lambda: OrthogonalHead("8", 4), "in_features")])
def test_a_layer_built_with_a_count_that_is_not_a_positive_integer_says_which(build, named):
    with pytest.raises(ValueError, match=f"{named} must be an integer >= 1"):
        build()
    assert ACDCStack(np.int64(32), np.int64(16))(torch.randn(2, 32)).shape == (2, 16)  # numpy integers are integers


def test_no_fixed_head_is_offered_on_one_feature():
    """One feature, normalised, is +1 or -1: a fixed head gives every sample one of two logit vectors, so
    no fixed head replaces a 1-feature Linear (the Hadamard refusal advised --head orthogonal, which then
    compressed to a model that predicted 2 of 5 classes) and the advice is --head keep."""
    from compressor.layers.registry import spec_for

    with pytest.raises(ValueError, match=r"only \+1 or -1"):
        OrthogonalHead(1, 2)
    assert spec_for("head", "orthogonal").unsupported(1, 5).endswith("use --head keep")
    assert spec_for("head", "hadamard").unsupported(1, 5).endswith("use --head keep")
    assert spec_for("head", "hadamard").unsupported(2, 5).endswith("use --head orthogonal or --head keep")
    assert spec_for("head", "orthogonal").unsupported(2, 5) == ""
