"""ONNX export: matches PyTorch in ONNX Runtime, keeps the compression, fails loudly and cleanly."""
from __future__ import annotations

import copy
import math
import os

import onnx
import pytest
import torch
from torch import nn

from compressor.checkpoint import load_model
from compressor.data import load_data
from compressor.errors import ExportError, OutputError
from compressor.options import PlanOptions
from compressor.surgery import apply_plan, initialise_from_dense, make_plan
from compressor.export import export_onnx, stored_state_bytes
from compressor.runtime import session as ort_session
from compressor.layers import ACDC, ACDCStack, AdaptiveFastfood, HadamardHead, OrthogonalHead
from compressor.transforms import dct_radices, kronecker_orders
from conftest import SAMPLES

MODULES = {
    "acdc": lambda: ACDC(1024),
    "acdc_stack": lambda: ACDCStack(1000, 300, 3),
    "fastfood": lambda: AdaptiveFastfood(1000, 2500),
    "hadamard_head": lambda: HadamardHead(1024, 1000),
    "orthogonal_head": lambda: OrthogonalHead(256, 100),
}


@pytest.mark.parametrize("name", MODULES)
def test_each_module_exports_small_and_exact(name, tmp_path):
    module = MODULES[name]()
    x = torch.randn(16, module.in_features)
    result = export_onnx(module, x, tmp_path / "m.onnx")
    assert result.files["onnx"].max_rel_diff <= 1e-4
    model = onnx.load(tmp_path / "m.onnx")
    assert not any(node.metadata_props for node in model.graph.node)  # exporter debug info stripped
    n, c = module.in_features, module.out_features
    limit = (c * n if name.endswith("head") else max(n, c) ** 2) / 4
    biggest = max(onnx.numpy_helper.to_array(i).size for i in model.graph.initializer)
    if name != "orthogonal_head":  # the orthogonal head stores its C x N matrix by design
        assert biggest < limit
    # dynamic batch: another batch size runs and matches
    session = ort_session(str(tmp_path / "m.onnx"))
    x5 = torch.randn(5, n)
    got = session.run(None, {session.get_inputs()[0].name: x5.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), module(x5).detach(), rtol=1e-4, atol=1e-4)


def caffenet_head(compressed: bool) -> nn.Module:
    """FC6-FC7-FC8 of CaffeNet (9216 -> 4096 -> 4096 -> 1000), dense or in fixclf's default form."""
    if not compressed:
        return nn.Sequential(nn.Linear(9216, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))
    return nn.Sequential(ACDCStack(9216, 4096, 2), nn.ReLU(), ACDCStack(4096, 4096, 2, seed=1), nn.ReLU(), HadamardHead(4096, 1000))


def expected_constant_bytes(dct_sizes: list[int], wht_sizes: list[int]) -> int:
    """Independent estimate of the shared transform constants, one set per size.

    DCT of n with radices r_1 .. r_S (spectrum length L_s = r_1 .. r_s): the r_1 x r_1 first stage;
    per later stage the two 2r x 2r patterns and the real unit's 2r x 2r block, and the cosines and
    sines of the other L_(s-1)/2 - 1 blocks (r each), float32; three n-long int32 index vectors
    (Makhoul's order in and out, the chain's output order). The DCT-III is the same constants
    transposed. Walsh-Hadamard of n: its Kronecker factors (16 x 16 x 16 at 4096: one 16 x 16).
    """
    total = 0
    for n in dct_sizes:
        radices = dct_radices(n)
        floats, length = radices[0] ** 2, radices[0]
        for r in radices[1:]:
            floats += 3 * (2 * r) ** 2 + 2 * r * (length // 2 - 1)
            length *= r
        total += 4 * floats + 4 * 3 * n
    for n in wht_sizes:
        total += 4 * sum(d * d for d in set(kronecker_orders(n)))  # equal factors are one initializer
    return total


def test_caffenet_scale_head_is_100x_smaller_and_as_expected(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 9216)
    # the dense file holds its 58.6M float32 weights at least (exporting its 234 MB would prove no more)
    dense_bytes = 4 * sum(p.numel() for p in caffenet_head(False).parameters())
    small_model = caffenet_head(True)
    small = export_onnx(small_model, x, tmp_path / "small.onnx")
    small_bytes = small.files["onnx"].bytes
    assert dense_bytes >= 100 * small_bytes, (dense_bytes, small_bytes)
    expected = stored_state_bytes(small_model) + expected_constant_bytes([9216, 4096], [4096])
    assert abs(small_bytes - expected) <= 0.10 * expected, (small_bytes, expected)
    # one initializer per transform size, however many layers (and the DCT-II and DCT-III) use it
    shapes = [tuple(i.dims) for i in onnx.load(tmp_path / "small.onnx").graph.initializer]
    for n in (9216, 4096):
        radices = dct_radices(n)
        blocks = math.prod(radices[:-1]) // 2 - 1
        assert shapes.count((blocks, radices[-1])) == 2  # the last stage's cosines and sines, once per size
        assert not any(math.prod(shape) >= n * radices[-1] for shape in shapes)  # no stage's full (B, 2r, 2r) matrices


def test_failed_validation_leaves_no_file(tmp_path):
    class ExportsDifferently(nn.Module):
        """Adds 1 only while being exported: the ONNX file cannot match PyTorch."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            y = self.linear(x)
            return y + 1 if torch.compiler.is_exporting() else y

    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(ExportsDifferently(), torch.randn(4, 4), target)
    assert os.listdir(tmp_path) == []


def test_int8_and_ort_format(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), ACDCStack(256, 256, 2), nn.ReLU(), HadamardHead(256, 10))
    x = torch.randn(64, 64)
    full = export_onnx(model, x, tmp_path / "f.onnx", ort_format=True)
    int8 = export_onnx(model, x, tmp_path / "q.onnx", quantize="int8")
    assert int8.files["onnx-int8"].bytes < full.files["onnx"].bytes and int8.files["onnx-int8"].top1_agreement >= 0.98
    assert not any("no smaller" in note for note in int8.notes)
    tiny = export_onnx(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)), torch.randn(16, 8), tmp_path / "t.onnx",
                       quantize="int8")  # 44 weights: the quantisation's nodes and scales outweigh what it saves
    assert any("no smaller than the float32 one" in note for note in tiny.notes), tiny.notes
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    assert full.files["ort"].path == str(tmp_path / "f.ort") and os.path.getsize(tmp_path / "f.ort") > 0
    # the .ort file runs in ONNX Runtime and matches PyTorch (the mobile runtime loads the same format)
    ort_out = ort_session(tmp_path / "f.ort").run(None, {"input": x[:8].numpy()})[0]
    assert torch.allclose(torch.from_numpy(ort_out), model(x[:8]).detach(), atol=1e-4)
    # no dense layer left: the float file is written and the result says why int8 was skipped
    none = export_onnx(ACDCStack(32, 32, 1), torch.randn(4, 32), tmp_path / "none.onnx", quantize="int8")
    assert set(none.files) == {"onnx"} and "int8 skipped" in none.notes[0]
    assert {n.op_type for n in onnx.load(tmp_path / "none.onnx").graph.node}.isdisjoint({"MatMulInteger", "DynamicQuantizeLinear"})
    with pytest.raises(ExportError, match="unknown quantisation"):
        export_onnx(model, x, tmp_path / "int4.onnx", quantize="int4")
    assert sorted(os.listdir(tmp_path)) == ["f.onnx", "f.ort", "none.onnx", "q.onnx", "t.onnx"]


def test_the_exporters_operator_registry_is_built_once_and_put_back():
    """to_onnx reuses torch's ATen -> ONNX registry across exports (same bytes as a fresh one) and
    leaves torch's own builder in place afterwards."""
    from torch.onnx._internal.exporter import _registration

    import compressor.export as export

    torchs_own = _registration.ONNXRegistry.__dict__["from_torchlib"]
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), HadamardHead(16, 4)), torch.randn(4, 8)
    first, second = export.to_onnx(model, x).proto, export.to_onnx(model, x).proto
    assert first.SerializeToString() == second.SerializeToString()
    assert len(export._OPERATOR_REGISTRIES) == 1
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is torchs_own


def test_the_dispatcher_walk_runs_once_per_list_of_registered_operators(monkeypatch):
    """to_onnx skips torch.export's walk over the dispatcher's CompositeImplicitAutograd operators when
    it has walked that very list before (same bytes out), walks again once an operator is registered
    (a user's custom op), and leaves torch's own walk in place afterwards."""
    from torch._export import utils as export_utils

    import compressor.export as export

    walks = []
    torchs_own = export_utils._materialize_cpp_cia_ops
    counted = lambda: walks.append(torchs_own())  # noqa: E731
    monkeypatch.setattr(export_utils, "_materialize_cpp_cia_ops", counted)
    monkeypatch.setattr(export, "_MATERIALISED_CIA_REGISTRATIONS", set())
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), HadamardHead(16, 4)), torch.randn(4, 8)
    first = export.to_onnx(model, x).proto
    assert len(walks) == 1
    assert export.to_onnx(model, x).proto.SerializeToString() == first.SerializeToString() and len(walks) == 1
    library = torch.library.Library("fixclf_walk_test", "DEF")
    library.define("twice(Tensor x) -> Tensor")
    library.impl("twice", lambda t: t * 2, "CompositeImplicitAutograd")
    export.to_onnx(model, x)
    assert len(walks) == 2
    assert export_utils._materialize_cpp_cia_ops is counted  # what was there before each export, put back
    library._destroy()


def test_int8_weights_are_unsigned_and_accurate_on_every_cpu(tmp_path):
    """A plain nn.Linear with PyTorch's uniform init fills the 8-bit range: with signed weights ONNX
    Runtime's U8S8 kernel saturates its int16 pair sums on x86 CPUs without VNNI (39% relative error
    measured on AVX2). The file stores unsigned weights, whose kernels cannot overflow, and the
    logits stay within 3% of the largest float logit."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)), torch.randn(256, 64)
    export_onnx(model, x, tmp_path / "q.onnx", quantize="int8")
    graph = onnx.load(tmp_path / "q.onnx").graph
    quantised = [i for i in graph.initializer if i.name.endswith("_quantized")]
    assert len(quantised) == 2 and {i.data_type for i in quantised} == {onnx.TensorProto.UINT8}
    got = ort_session(tmp_path / "q.onnx").run(None, {"input": x.numpy()})[0]
    reference = model(x).detach().numpy()
    assert abs(got - reference).max() <= 0.03 * abs(reference).max()


@pytest.mark.parametrize("sample", ["mlp", "cnn"])
def test_fp16_export_of_the_compressed_samples_agrees_with_float32(sample, tmp_path):
    """The structured transforms in half precision: >= 99% top-1 agreement on held-out rows (the
    acceptance rule), and logits within 1% of the largest float32 logit."""
    loaded = load_model(SAMPLES / f"{sample}.pt")
    data = load_data(loaded.data)
    plan = make_plan(loaded.model, PlanOptions())
    model = apply_plan(copy.deepcopy(loaded.model), plan)
    x = data.head("train", 256)[0]
    initialise_from_dense(loaded.model, model, plan, x)
    val = data.head("val", 359)[0]
    result = export_onnx(model, val, tmp_path / "h.onnx", precision="fp16")
    fp16 = result.files["onnx-fp16"]
    assert fp16.top1_agreement >= 0.99 and fp16.max_rel_diff < 0.01, fp16
    assert "float16" in {onnx.TensorProto.DataType.Name(i.data_type).lower() for i in onnx.load(tmp_path / "h.onnx").graph.initializer}


def test_int8_quantises_every_dense_linear_also_on_token_inputs(tmp_path):
    """A Linear on (batch, tokens, features) exports as a MatMul with its weight pre-transposed under a new
    name; it is still a stored weight, so int8 quantises it (the transform MatMuls stay float)."""
    import architectures

    torch.manual_seed(0)
    model = nn.Sequential(architectures.Block(64, 4), nn.Flatten(), nn.Linear(16 * 64, 10))
    x = torch.randn(8, 16, 64)
    int8 = export_onnx(model, x, tmp_path / "q.onnx", quantize="int8").files["onnx-int8"]
    quantised = [n for n in onnx.load(tmp_path / "q.onnx").graph.node if n.op_type == "MatMulInteger"]
    assert len(quantised) == sum(isinstance(m, nn.Linear) for m in model.modules())  # qkv, proj, fc1, fc2, the head
    assert int8.bytes < 0.35 * export_onnx(model, x, tmp_path / "f.onnx").files["onnx"].bytes


class _AttentionClassifier(nn.Module):
    """nn.MultiheadAttention (its in_proj_weight a bare parameter, its out_proj a Linear subclass) then a
    Linear subclass as the head, as timm and torchvision write them."""

    class Head(nn.Linear):
        pass

    def __init__(self) -> None:
        super().__init__()
        self.attention, self.head = nn.MultiheadAttention(32, 4, batch_first=True), self.Head(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))


def test_int8_finds_dense_weights_outside_plain_linears(tmp_path):
    """Attention's projections and Linear subclasses are dense weights int8 quantises (they were taken for
    'no Linear left' and int8 was skipped); structured layers, fixed heads and embedding tables are not."""
    from compressor.export import choose_formats, has_dense_layers

    model = _AttentionClassifier().eval()
    assert has_dense_layers(model) and has_dense_layers(model.attention)
    assert not any(has_dense_layers(m) for m in (ACDCStack(64, 128, 2), AdaptiveFastfood(64, 100), HadamardHead(64, 10),
                                                 OrthogonalHead(64, 10), nn.Embedding(10, 4)))
    assert choose_formats(model, {"onnx-int8": "onnx"}) == ({"onnx-int8": "onnx"}, [])
    x = torch.randn(16, 7, 32)
    int8 = export_onnx(model, x, tmp_path / "q.onnx", quantize="int8").files["onnx-int8"]
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(tmp_path / "q.onnx").graph.node)
    assert int8.bytes < export_onnx(model, x, tmp_path / "f.onnx").files["onnx"].bytes


def test_parametrised_weights_are_exported_as_the_plain_weights_they_make(tmp_path):
    """torch.nn.utils.parametrizations (orthogonal: a matrix exponential ONNX has no form for; weight_norm)
    are computed once into plain weights in the file; the caller's model keeps its parametrisations
    (torch's removal deletes them from the class the copy shares with it)."""
    from torch.nn.utils import parametrizations, parametrize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    parametrizations.orthogonal(model[2])
    parametrizations.weight_norm(model[4])
    x = torch.randn(8, 16)
    expected = model(x)
    result = export_onnx(model, x, tmp_path / "m.onnx")
    assert result.files["onnx"].max_rel_diff <= 1e-4
    assert {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node} <= {"Gemm", "Relu", "MatMul", "Add"}
    assert parametrize.is_parametrized(model[2]) and parametrize.is_parametrized(model[4])
    assert torch.equal(model(x), expected)


def test_pruned_weights_are_exported_and_counted_as_the_weights_they_make(tmp_path):
    """torch.nn.utils.prune keeps weight_orig and weight_mask and multiplies them before each call: the
    file stores the weight they make (not both, recomputed every inference), the stored numbers count it
    once, and the caller's model stays pruned."""
    from torch.nn.utils import prune

    from compressor.layers import count_stored

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    prune.l1_unstructured(model[0], "weight", 0.5)
    x = torch.randn(8, 16)
    expected = model(x)
    result = export_onnx(model, x, tmp_path / "m.onnx")
    assert result.files["onnx"].max_rel_diff <= 1e-4
    assert sorted(i.name for i in onnx.load(tmp_path / "m.onnx").graph.initializer) == ["0.bias", "0.weight", "2.bias",
                                                                                     "2.weight"]
    assert count_stored(model) == 16 * 32 + 32 + 32 * 4 + 4
    assert prune.is_pruned(model) and torch.equal(model(x), expected)


def test_export_leaves_the_callers_model_as_it_was(tmp_path):
    """A float64 model in training mode is exported in eval mode and float32, and stays float64 and in
    training mode (a model exported mid-training keeps training as before). Bad arguments are refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), ACDCStack(32, 32, 2), HadamardHead(32, 4)).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 16)
    result = export_onnx(model, x, tmp_path / "m.onnx")
    assert result.files["onnx"].max_rel_diff <= 1e-4
    assert all(m.training for m in model.modules()) and all(p.dtype == torch.float64 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ExportError, match="unknown precision 'fp61'"):
        export_onnx(model, x, tmp_path / "p.onnx", precision="fp61")
    with pytest.raises(ExportError, match="must end in .onnx"):
        export_onnx(model, x, tmp_path / "m.txt")
    with pytest.raises(ExportError, match="dynamic_tokens must be True or False"):
        export_onnx(model, x, tmp_path / "d.onnx", dynamic_tokens="no")
    with pytest.raises(OutputError, match="directory .*nodir does not exist; create it"):
        export_onnx(model, x, tmp_path / "nodir" / "m.onnx")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
