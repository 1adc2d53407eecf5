"""Shapes of real architectures end to end through the CLI: conv + BatchNorm + ``fc`` head, a
ViT-style model on (batch, tokens, features), an MLP-Mixer with token-mixing Linears. For each:
``plan``, ``compress`` (a few steps), ``report`` without ``--arch``, ``export`` with it,
``load_compressed_model(path, arch=...)`` equal to the ONNX file, kept BatchNorm statistics
byte-identical, and ``--json`` output that stays JSON although the architecture prints."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import architectures
from cli.main import app
from compressor import PlanOptions, load_compressed_model
from compressor.runtime import run, session
from compressor.surgery import make_plan

runner = CliRunner()
INPUTS = {"resnet_style": (64,), "vit_style": (16, 4), "mixer_style": (16, 4)}
ARCH = {name: f"architectures:{name}" for name in INPUTS}


def _checkpoint_and_data(name: str, workdir) -> None:
    torch.manual_seed(0)
    model = getattr(architectures, name)()
    for module in model.modules():  # trained-looking statistics, so that overwriting them would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(1000)
    torch.save(model.state_dict(), workdir / f"{name}.pt")
    x = torch.randn(320, *INPUTS[name])
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    np.savez(workdir / "data.npz", x=x.numpy(), y=y.numpy())


@pytest.mark.parametrize("name", INPUTS)
def test_real_architecture_shapes_end_to_end(name, workdir):
    _checkpoint_and_data(name, workdir)
    plan = runner.invoke(app, ["plan", f"{name}.pt", "--arch", ARCH[name], "--json"])
    assert plan.exit_code == 0, plan.output
    layers = json.loads(plan.stdout)["layers"]
    assert layers[-1]["role"] == "head"  # the 4 -> 32 embeddings stay dense: ACDC would store more numbers
    assert all(bool(layer["kind"]) == (layer["name"] != "embed") for layer in layers)
    assert all("would store 224 numbers, the dense layer 160" in layer["reason"] for layer in layers if not layer["kind"])
    assert all(layer["cost"] is None for layer in layers)  # no data given: nothing to time the layers on
    assert any("pass --data" in note and "feeding" in note for note in json.loads(plan.stdout)["notes"])

    result = runner.invoke(app, ["compress", f"{name}.pt", "--arch", ARCH[name], "--data", "data.npz", "--epochs", "1",
                                 "--latency-batch", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["onnx"]["max_rel_diff"] <= 1e-4

    stored = runner.invoke(app, ["report", f"{name}.fixclf.pt", "--json"])  # no --arch: the model is not built
    assert stored.exit_code == 0 and json.loads(stored.stdout)["params"] == report["params"]
    refused = runner.invoke(app, ["export", f"{name}.fixclf.pt", "-o", "again.onnx", "--data", "data.npz"])
    assert refused.exit_code == 3 and f"--arch {ARCH[name]}" in refused.stderr
    again = runner.invoke(app, ["export", f"{name}.fixclf.pt", "-o", "again.onnx", "--data", "data.npz",
                                "--arch", ARCH[name]])
    assert again.exit_code == 0, again.output

    model = load_compressed_model(f"{name}.fixclf.pt", arch=getattr(architectures, name))
    assert torch.equal(model(torch.ones(2, *INPUTS[name])), load_compressed_model(f"{name}.fixclf.pt", arch=ARCH[name])(
        torch.ones(2, *INPUTS[name])))
    in_bfloat16 = load_compressed_model(f"{name}.fixclf.pt",  # the float32 values, not rounded to the factory's dtype
                                        arch=lambda **kwargs: getattr(architectures, name)(**kwargs).to(torch.bfloat16))
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in in_bfloat16.state_dict().items())
    x = torch.from_numpy(np.load("data.npz")["x"][:64])
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(run(session(f"{name}.fixclf.onnx"), x))
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))

    original = torch.load(f"{name}.pt", weights_only=True)
    compressed = torch.load(f"{name}.fixclf.pt", weights_only=True)["state_dict"]
    statistics = [k for k in original if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(original[k], compressed[k]) for k in statistics)
    assert (name == "resnet_style") == bool(statistics)


def test_norm_statistics_update_only_when_asked(workdir):
    _checkpoint_and_data("resnet_style", workdir)
    result = runner.invoke(app, ["compress", "resnet_style.pt", "--arch", ARCH["resnet_style"], "--data", "data.npz",
                                 "--epochs", "1", "--update-norm-stats", "--latency-batch", "8", "--json"])
    assert result.exit_code == 0, result.output
    original = torch.load("resnet_style.pt", weights_only=True)
    compressed = torch.load("resnet_style.fixclf.pt", weights_only=True)["state_dict"]
    assert not torch.equal(original["bn1.running_mean"], compressed["bn1.running_mean"])


def test_running_statistics_of_any_module_stay_unless_asked(workdir):
    """A running_* buffer outside PyTorch's norm classes (timm's EvoNorm) is frozen like BatchNorm's:
    its module runs in eval mode in the fine-tune, its dropout child still trains."""
    from compressor.finetune import freeze_norm_statistics

    model, _ = _labelled("running_variance", rows=320, features=16)
    freeze_norm_statistics(model.train())
    assert not model[1].training and model[1].drop.training
    result = runner.invoke(app, ["compress", "running_variance.pt", "--arch", "architectures:running_variance",
                                 "--data", "data.npz", "--epochs", "1", "--latency-batch", "8"])
    assert result.exit_code == 0, result.output
    stored = torch.load("running_variance.fixclf.pt", weights_only=True)["state_dict"]["1.running_var"]
    assert torch.equal(stored, torch.load("running_variance.pt", weights_only=True)["1.running_var"])


def test_running_statistics_the_model_itself_holds_stay_and_its_forward_keeps_training(workdir):
    """The model's own running_* buffer and moving_* parameter without gradient: the model is not put in
    eval mode (its own dropout still trains), its statistics are put back after every step."""
    from compressor.finetune import freeze_norm_statistics

    model, _ = _labelled("running_root", rows=320, features=16)
    freeze_norm_statistics(model.train())
    assert model.training
    result = runner.invoke(app, ["compress", "running_root.pt", "--arch", "architectures:running_root",
                                 "--data", "data.npz", "--epochs", "1", "--latency-batch", "8"])
    assert result.exit_code == 0, result.output
    stored = torch.load("running_root.fixclf.pt", weights_only=True)["state_dict"]
    original = torch.load("running_root.pt", weights_only=True)
    assert torch.equal(stored["running_mean"], original["running_mean"])
    assert torch.equal(stored["moving_var"], original["moving_var"])


def test_a_model_caching_computed_tensors_in_eval_mode_is_copied_and_compressed(workdir):
    """LeViT caches its attention biases in eval mode: after the forward pass that surveys the model
    (gradients on), the cache holds a non-leaf tensor, which copy.deepcopy refuses."""
    _labelled("caches_in_eval", rows=320, features=16)
    result = runner.invoke(app, ["compress", "caches_in_eval.pt", "--arch", "architectures:caches_in_eval",
                                 "--data", "data.npz", "--epochs", "1", "--latency-batch", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert {layer["name"]: layer["kind"] for layer in json.loads(result.stdout)["layers"]} == {
        "fc1": "acdc", "fc2": "acdc", "head": "hadamard"}


def test_json_stays_json_when_user_code_prints(workdir):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    torch.save(model.state_dict(), workdir / "noisy.pt")
    (workdir / "noisy.py").write_text("import torch\n"
                                      "def net():\n    print('banner from a model zoo')\n"
                                      "    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))\n")
    result = runner.invoke(app, ["plan", "noisy.pt", "--arch", "noisy:net", "--json"])  # ./noisy.py, as python -m finds it
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layers"][0]["name"] == "0"


def test_plan_times_each_layer_at_its_real_shape_and_objective_latency_keeps_the_slower(workdir):
    _checkpoint_and_data("mixer_style", workdir)
    args = ["plan", "mixer_style.pt", "--arch", ARCH["mixer_style"], "--data", "data.npz", "--latency-batch", "4", "--json"]
    latency = json.loads(runner.invoke(app, [*args, "--objective", "latency"]).stdout)  # timed whatever the objective
    timed = [layer for layer in latency["layers"] if "would store" not in layer["reason"]]  # the embeddings: not timed
    costs = {layer["name"]: layer["cost"] for layer in timed}
    assert set(costs) == {"token_mix", "channel_mix", "head"}
    assert costs["token_mix"]["tokens"] == [32] and costs["channel_mix"]["tokens"] == [16]  # (batch, features, tokens)
    assert all(c["batch"] == 4 and c["dense_batch1_ms"] > 0 and c["structured_batch_ms"] > 0 for c in costs.values())
    for layer in timed:  # kept exactly when its replacement was measured slower at batch 1
        c = layer["cost"]
        if layer["kind"] is None:
            assert "slower than dense at batch 1" in layer["reason"] and c["structured_batch1_ms"] >= c["dense_batch1_ms"]
        else:
            assert c["structured_batch1_ms"] <= c["dense_batch1_ms"]
    if all(layer["kind"] is None for layer in latency["layers"]):  # then compress has nothing to do: exit 5
        result = runner.invoke(app, ["compress", "mixer_style.pt", "--arch", ARCH["mixer_style"], "--data", "data.npz",
                                     "--objective", "latency", "--epochs", "1", "--latency-batch", "4", "--json"])
        if result.exit_code == 0:  # compress times the layers again: this time a replacement measured faster
            assert any(layer["kind"] is not None for layer in json.loads(result.stdout)["layers"])
        else:
            assert result.exit_code == 5 and "--objective size" in result.stderr


class _FlattensWithView(torch.nn.Module):
    """A convolution whose activations are flattened with .view, which a channels-last layout breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        y = self.conv(x.reshape(-1, 1, 8, 8))
        return self.fc(y.view(y.shape[0], -1))


def test_convolutional_models_fine_tune_channels_last_and_come_back_in_their_layout():
    from compressor.finetune import channels_last
    from compressor.zoo import mlp, small_cnn

    torch.manual_seed(0)
    cnn, viewing, plain, x = small_cnn(), _FlattensWithView(), mlp(64, [32], 10), torch.randn(4, 64)
    cnn.train()
    expected = cnn.eval()(x)
    cnn.train()
    assert channels_last([cnn, viewing, plain], x[:2]) == [cnn]  # no convolution: untouched; .view fails: put back
    second = cnn.features[2].weight
    assert second.is_contiguous(memory_format=torch.channels_last) and not second.is_contiguous()
    assert viewing.conv.weight.is_contiguous() and cnn.training  # the trial forward ran in eval mode only
    assert torch.allclose(cnn.eval()(x), expected, atol=1e-5)  # the same function in the other layout
    cnn.to(memory_format=torch.contiguous_format)
    assert second.is_contiguous()


def test_fine_tune_leaves_convolution_weights_in_the_default_layout(workdir):
    _checkpoint_and_data("resnet_style", workdir)
    result = runner.invoke(app, ["compress", "resnet_style.pt", "--arch", ARCH["resnet_style"], "--data", "data.npz",
                                 "--epochs", "1", "--json"])
    assert result.exit_code == 0, result.output
    state = torch.load("resnet_style.fixclf.pt", weights_only=True)["state_dict"]  # saved as they were left
    weights = [t for t in state.values() if t.dim() == 4]
    assert weights and all(w.is_contiguous() for w in weights)


def _labelled(name: str, rows: int, features: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """``architectures.<name>()`` saved as NAME.pt, and data.npz: random rows labelled by the model."""
    torch.manual_seed(0)
    model = getattr(architectures, name)().eval()
    torch.save(model.state_dict(), f"{name}.pt")
    x = torch.randn(rows, features)
    with torch.no_grad():
        np.savez("data.npz", x=x.numpy(), y=model(x).argmax(1).numpy())
    return model, x


def test_the_head_is_the_linear_that_makes_the_logits_and_ties_hold(workdir):
    """Head registered first, a Linear under two names, an auxiliary Linear never called: the plan
    follows the forward pass, the tie survives compress and reload (20 classes on 16 features: the
    head's code placement is rebuilt on reload, and the stack feeding it, deepened, reads back), and
    the parameters are counted once."""
    model, x = _labelled("tangled", rows=320, features=8)
    result = runner.invoke(app, ["compress", "tangled.pt", "--arch", "architectures:tangled", "--data", "data.npz",
                                 "--epochs", "1", "--latency-batch", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    layers = {layer["name"]: (layer["role"], layer["kind"], layer["reason"]) for layer in report["layers"]}
    assert layers == {"head": ("head", "hadamard", ""), "embed": ("hidden", "acdc", ""),
                      "block": ("hidden", "acdc", "depth 4: feeds a fixed head of 20 classes on 16 features"),
                      "aux": ("hidden", None, "not called by the forward pass")}
    assert report["params"]["model"]["before"] == sum(p.numel() for p in model.parameters())  # block once
    compressed = load_compressed_model("tangled.fixclf.pt", arch="architectures:tangled")
    assert compressed.block is compressed.again and type(compressed.block).__name__ == "ACDCStack"
    with torch.no_grad():
        expected = compressed(x[:64])
    got = torch.from_numpy(run(session("tangled.fixclf.onnx"), x[:64]))
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))
    again = runner.invoke(app, ["export", "tangled.fixclf.pt", "-o", "again.onnx", "--data", "data.npz",
                                "--arch", "architectures:tangled"])
    assert again.exit_code == 0, again.output


def test_a_weight_shared_by_two_linears_is_counted_once_and_the_checkpoint_reads_back(workdir):
    """b and c share one weight tensor: the model holds it once, replacing both frees it once, and a
    kept layer that still holds it keeps it in the model (the counts stay those of the real files)."""
    from compressor import CompressOptions, PlanOptions, SourceOptions, plan_checkpoint

    model, _ = _labelled("shared_weight", rows=320, features=16)
    shared, bias = 64 * 64, 64
    before = sum(p.numel() for p in model.parameters())
    assert before == 16 * 64 + 64 + shared + 2 * bias + 64 * 5 + 5
    result = runner.invoke(app, ["compress", "shared_weight.pt", "--arch", "architectures:shared_weight", "--data",
                                 "data.npz", "--epochs", "1", "--latency-batch", "8", "--json"])
    assert result.exit_code == 0, result.output
    params = json.loads(result.stdout)["params"]
    compressed = load_compressed_model("shared_weight.fixclf.pt", arch="architectures:shared_weight")
    assert params["model"] == {"before": before, "after": sum(p.numel() for p in compressed.state_dict().values()),
                               "ratio": params["model"]["ratio"]}
    assert params["replaced"]["before"] == before  # every layer replaced, the shared weight once
    shown = runner.invoke(app, ["report", "shared_weight.fixclf.pt", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["params"] == params, shown.output

    source = SourceOptions("shared_weight.pt", arch="architectures:shared_weight", data="data.npz")
    kept_c = plan_checkpoint(CompressOptions(source, plan=PlanOptions(exclude=["c"])))
    after_b = next(row.params_after for row in kept_c.layers if row.name == "b")
    assert kept_c.params.replaced.before == before - bias - shared  # a, b, head, without the weight c still holds
    saved = kept_c.params.model.before - kept_c.params.model.after
    assert saved == kept_c.params.replaced.before - kept_c.params.replaced.after  # both rows count the same saving
    assert kept_c.params.model.after == kept_c.params.replaced.after + shared + bias  # c keeps the weight
    assert after_b < shared


def test_integer_images_a_model_converts_itself_are_fed_as_stored_with_a_warning(workdir):
    """uint8 rows that a model takes both ways but answers differently (it converts its own bytes, x / 255)
    are fed as stored, the ONNX input included, so that the model's own conversion runs (as float32, the
    teacher saw values 255x too large), and the report says so; the float32 and float16 files validate."""
    import onnx

    torch.manual_seed(0)
    model = architectures.byte_images().eval()
    torch.save(model.state_dict(), "bytes.pt")
    images = torch.randint(0, 256, (240, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        labels = model(images).argmax(1)
        assert (model(images.float()).argmax(1) != labels).any()  # the other feeding would mislabel
    np.savez("bytes.npz", x=images.numpy(), y=labels.numpy())
    result = runner.invoke(app, ["compress", "bytes.pt", "--arch", "architectures:byte_images", "--data", "bytes.npz",
                                 "--epochs", "1", "--latency-batch", "8", "--precision", "fp16", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["accuracy"]["before"] == 1.0 and report["options"]["mixup"] is False
    assert any("stored as uint8" in warning and "feeds them as stored" in warning for warning in report["warnings"])
    assert onnx.load("bytes.fixclf.onnx").graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    compressed = load_compressed_model("bytes.fixclf.pt", arch="architectures:byte_images")
    with torch.no_grad():
        expected = compressed(images[:16])
    got = torch.from_numpy(run(session("bytes.fixclf.fp16.onnx"), images[:16]))
    assert (got - expected).abs().max() <= 1e-2 * max(1.0, float(expected.abs().max()))


def test_token_ids_into_an_embedding_train_export_and_run_as_integers(workdir):
    """x of whole numbers that the model takes only as integers (token ids): fed as int64 everywhere, the
    ONNX input is int64 and matches PyTorch, rows are not mixed (--mixup is refused), export reruns."""
    import onnx

    torch.manual_seed(0)
    model = architectures.token_classifier().eval()
    torch.save(model.state_dict(), "tokens.pt")
    tokens = torch.randint(0, 100, (320, 12))
    with torch.no_grad():
        np.savez("data.npz", x=tokens.numpy(), y=model(tokens).argmax(1).numpy())
    arch = ["--arch", "architectures:token_classifier", "--data", "data.npz"]
    refused = runner.invoke(app, ["compress", "tokens.pt", *arch, "--epochs", "1", "--mixup"])
    assert refused.exit_code == 2 and "integer inputs (int64: token ids" in refused.output, refused.output
    result = runner.invoke(app, ["compress", "tokens.pt", *arch, "--epochs", "1", "--latency-batch", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["options"]["mixup"] is False
    assert {layer["name"]: layer["kind"] for layer in report["layers"]} == {"fc1": "acdc", "fc2": "acdc", "head": "hadamard"}
    graph = onnx.load("tokens.fixclf.onnx").graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    compressed = load_compressed_model("tokens.fixclf.pt", arch="architectures:token_classifier")
    with torch.no_grad():
        expected = compressed(tokens[:64])
    got = torch.from_numpy(run(session("tokens.fixclf.onnx"), tokens[:64]))
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))
    again = runner.invoke(app, ["export", "tokens.fixclf.pt", "-o", "again.onnx", *arch, "--dynamic-tokens"])
    assert again.exit_code == 0, again.output
    for length in (1, 5, 40):  # the exported file takes any sequence length (validated at 12 and 11)
        ids = torch.randint(0, 100, (3, length))
        with torch.no_grad():
            expected = compressed(ids)
        assert (torch.from_numpy(run(session("again.onnx"), ids)) - expected).abs().max() <= 1e-4


def test_dynamic_tokens_export_token_features_of_any_length_and_refuse_a_fixed_length(workdir):
    """--dynamic-tokens: the compressed (batch, tokens, features) model's file runs at other token counts
    and matches PyTorch; a model whose position embedding or token-mixing layer fixes the count, and
    inputs with no token axis, are refused by name before any work."""
    from compressor.errors import DataError, ExportError
    from compressor.export import ExportSpec, to_onnx

    torch.manual_seed(0)
    original = architectures.any_length_tokens().eval()
    torch.save(original.state_dict(), "any_length_tokens.pt")
    x = torch.randn(320, 16, 4)
    with torch.no_grad():
        np.savez("data.npz", x=x.numpy(), y=original(x).argmax(1).numpy())
    result = runner.invoke(app, ["compress", "any_length_tokens.pt", "--arch", "architectures:any_length_tokens",
                                 "--data", "data.npz", "--epochs", "1", "--latency-batch", "8", "--dynamic-tokens", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["options"]["dynamic_tokens"] is True
    assert "inputs: any batch size and token count" in runner.invoke(app, ["report", "any_length_tokens.fixclf.pt"]).stdout
    import onnx

    dims = onnx.load("any_length_tokens.fixclf.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims][1:] == ["tokens", 4]
    model = load_compressed_model("any_length_tokens.fixclf.pt", arch="architectures:any_length_tokens")
    for length in (2, 7, 50):
        x = torch.randn(3, length, 4)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(run(session("any_length_tokens.fixclf.onnx"), x))
        assert (got - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))

    dynamic = ExportSpec(dynamic_tokens=True)
    for fixed in (architectures.vit_style(), architectures.mixer_style()):
        with pytest.raises(ExportError, match="fixes axis 1 of its inputs, taken as the token axis, at 16"):
            to_onnx(fixed, torch.randn(4, 16, 4), dynamic)
    with pytest.raises(DataError, match=r"no token axis"):
        to_onnx(architectures.resnet_style(), torch.randn(4, 3, 16, 16), dynamic)
    with pytest.raises(DataError, match=r"at least 2 tokens"):
        to_onnx(architectures.any_length_tokens(), torch.randn(4, 1, 4), dynamic)


@pytest.mark.parametrize("axis, above, size, refusal", [
    (1, 4, 16, "holds for 5 or more tokens only .* runs on 4 tokens"),  # recorded by the exporter as a range
    (1, 12, 8, "holds for 1 to 12 tokens only .* runs on 13 tokens"),
    (1, 1, 8, "on the rows cut or repeated to 1 tokens: ONNX output differs"),  # assumed true, not recorded
    (0, 1, 16, "on a single row: ONNX output differs"),
])
def test_an_export_is_refused_where_the_forward_branches_on_a_dynamic_size(workdir, axis, above, size, refusal):
    """The exporter keeps the path the example took through an ``if`` on the batch size or token count
    (sometimes recording it as a narrower range, sometimes not): the file would answer differently at
    sizes on the other side, so the export is refused, naming the sizes and the fix."""
    from compressor.errors import ExportError
    from compressor.export import export_onnx

    model = architectures.BranchesOnShape(axis, above).eval()
    with pytest.raises(ExportError, match=refusal):
        export_onnx(model, torch.randn(8, size, 4), "branch.onnx", dynamic_tokens=True)
    assert not os.path.exists("branch.onnx")


def test_a_token_range_the_model_itself_keeps_is_exported_with_a_note(workdir):
    """A convolution across the tokens needs 3 of them in PyTorch too: the file takes 3 or more, says so,
    and matches PyTorch at 3 and at 40 tokens; the float16 and ORT files are accepted at a second length too."""
    from compressor.export import export_onnx

    model = architectures.TokenConvolution().eval()
    result = export_onnx(model, torch.randn(64, 10, 4), "conv.onnx", dynamic_tokens=True, precision="fp16", ort_format=True)
    assert "the ONNX file takes 3 or more tokens, as the model does" in result.notes
    assert sorted(result.files) == ["onnx-fp16", "ort"]
    export_onnx(model, torch.randn(64, 10, 4), "conv.onnx", dynamic_tokens=True)
    for length in (3, 40):
        x = torch.randn(2, length, 4)
        with torch.no_grad():
            assert (torch.from_numpy(run(session("conv.onnx"), x)) - model(x)).abs().max() <= 1e-4


def test_a_recurrent_model_exported_twice_keeps_its_token_axis_both_times(workdir):
    """compress exports the original, then the compressed model, in one process: the GRU's token axis
    stays dynamic the second time too (torch's cached choice of the GRU's unrolling kernel fixed it)."""
    from compressor.export import export_onnx

    for attempt in ("original.onnx", "compressed.onnx"):
        model = architectures.RecurrentTokens().eval()
        export_onnx(model, torch.randn(16, 10, 8), attempt, dynamic_tokens=True)
        x = torch.randn(2, 23, 8)
        with torch.no_grad():
            assert (torch.from_numpy(run(session(attempt), x)) - model(x)).abs().max() <= 1e-4, attempt


def test_a_model_onnx_cannot_express_is_refused_before_the_fine_tune(workdir):
    """The original is exported first: the one-line error names the cause, and no step was trained."""
    from compressor import CompressOptions, FinetuneOptions, PlanOptions, SourceOptions, compress, plan_checkpoint
    from compressor.api import Events
    from compressor.errors import ExportError

    _labelled("branches_on_data", rows=200, features=8)
    stages = []

    class Recorder(Events):
        def stage(self, text: str) -> None:
            stages.append(text)

    options = CompressOptions(SourceOptions("branches_on_data.pt", arch="architectures:branches_on_data", data="data.npz"),
                              finetune=FinetuneOptions(epochs=50))
    with pytest.raises(ExportError, match="original model cannot be exported.*nothing was fine-tuned") as raised:
        compress(options, Recorder())
    assert "\x1b" not in str(raised.value) and "\n" not in str(raised.value)
    assert "torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch', min=1)},))" in str(raised.value)
    assert not any(stage.startswith("Fine-tuning") for stage in stages)
    assert sorted(os.listdir(".")) == ["branches_on_data.pt", "data.npz"]
    with pytest.raises(ExportError, match="original model cannot be exported.*compress would stop here"):
        plan_checkpoint(options)  # plan with data says so too, every layer kept or not
    with pytest.raises(ExportError, match="original model cannot be exported.*compress would stop here"):
        plan_checkpoint(replace(options, plan=PlanOptions(head="keep", hidden="keep")))


def test_an_architecture_of_lazy_modules_is_refused_with_the_fix(workdir):
    torch.save(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).state_dict(),
               workdir / "lazy.pt")
    result = runner.invoke(app, ["plan", "lazy.pt", "--arch", "architectures:lazy_mlp"])
    assert result.exit_code == 3 and "builds lazy modules" in result.stderr and "nn.Linear(in_features" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and os.listdir(workdir) == ["lazy.pt"]


def test_a_training_mode_output_not_led_by_the_logits_is_a_fine_tuning_error(workdir):
    """GoogLeNet / Inception return (logits, aux, ...) in training mode: fine-tuning uses the logits (with a
    report warning: tests/test_scale.py runs one under torchrun); a training-mode tuple that is not led by the
    logits is a fine-tuning error (exit 6) naming what the model returned, and nothing is written."""
    torch.manual_seed(0)
    x = torch.randn(200, 64)
    with torch.no_grad():
        y = architectures.aux_in_training().eval()(x).argmax(1)
    torch.save(architectures.aux_in_training().state_dict(), "aux.pt")
    np.savez("aux.npz", x=x.numpy(), y=y.numpy())
    refused = runner.invoke(app, ["compress", "aux.pt", "--data", "aux.npz", "--epochs", "1", "--arch",
                                  "architectures:aux_in_training", "--arch-kwargs", '{"first": "features"}'])
    assert refused.exit_code == 6 and "first element is a tensor of shape (64, 128)" in refused.stderr, refused.output
    assert sorted(os.listdir(".")) == ["aux.npz", "aux.pt"]


def test_a_model_that_returns_probabilities_is_distilled_as_its_logits_would_be(workdir):
    """A forward ending in softmax returns probabilities: the loss takes their logarithms (the logits up to
    a constant per row, which softmax, the distillation and the cross-entropy ignore), so fine-tuning takes
    the same steps as for the same model without the softmax; the report says so."""
    import copy

    from compressor import FinetuneOptions, PlanOptions
    from compressor.data import load_data
    from compressor.finetune import distill, outputs_probabilities
    from compressor.surgery import apply_plan, make_plan, replaced_parameters
    from conftest import SAMPLES

    torch.manual_seed(0)
    probabilities = architectures.softmax_mlp()
    logits = torch.nn.Sequential(*copy.deepcopy(probabilities)[:-1])
    data = load_data(SAMPLES / "digits.npz")
    x = data.head("train", 8)[0]
    assert outputs_probabilities(probabilities, x) and not outputs_probabilities(logits, x)
    assert not outputs_probabilities(probabilities, x[:0])  # no rows: nothing shows probabilities
    assert outputs_probabilities(copy.deepcopy(probabilities).bfloat16(), x.bfloat16())  # sums within bf16 rounding
    students = []
    for teacher in (logits, probabilities):
        plan = make_plan(teacher, PlanOptions())
        student = apply_plan(copy.deepcopy(teacher), plan)
        result = distill(student, teacher, data, FinetuneOptions(epochs=2), replaced_parameters(student, plan))
        assert result.probabilities == (teacher is probabilities)
        students.append(student.state_dict())
    assert all(torch.allclose(students[0][k], students[1][k], atol=1e-4) for k in students[0])

    torch.save(probabilities.state_dict(), "softmax.pt")
    report = json.loads(runner.invoke(app, ["compress", "softmax.pt", "--arch", "architectures:softmax_mlp",
                                            "--data", str(SAMPLES / "digits.npz"), "--epochs", "1", "--latency-batch", "8",
                                            "--json"]).stdout)
    assert any("returns probabilities" in note for note in report["notes"])


def test_a_model_without_a_head_is_told_that_head_replaced_nothing(workdir):
    """The last Linear feeds a BatchNorm, so no Linear makes the logits: --head cannot apply, and plan and
    compress (the same warning in its report) say so rather than quietly planning the classifier as hidden."""
    from conftest import SAMPLES

    torch.save(architectures.normalised_logits().state_dict(), "normed.pt")
    args = ["normed.pt", "--arch", "architectures:normalised_logits", "--data", str(SAMPLES / "digits.npz")]
    plan = json.loads(runner.invoke(app, ["plan", *args, "--json"]).stdout)
    assert [layer["role"] for layer in plan["layers"]] == ["hidden", "hidden"]
    assert any("no classification head was found" in w and "--head hadamard replaced nothing" in w for w in plan["warnings"])
    compressed = runner.invoke(app, ["compress", *args, "--epochs", "1", "--latency-batch", "8", "--json"])
    assert any("no classification head was found" in w for w in json.loads(compressed.stdout)["warnings"])


def test_a_one_row_batch_under_update_norm_stats_names_its_cause(workdir):
    """BatchNorm1d cannot update its statistics on one row: the error says whether --batch-size or the
    data's size gave the batch one row."""
    from conftest import SAMPLES

    torch.save(architectures.normalised_logits().state_dict(), "normed.pt")
    digits = np.load(SAMPLES / "digits.npz")
    np.savez("two_rows.npz", x=digits["x"][:2], y=digits["y"][:2])  # one row to train on, one held out
    args = ["compress", "normed.pt", "--arch", "architectures:normalised_logits", "--update-norm-stats", "--epochs", "1"]
    small_batch = runner.invoke(app, [*args, "--data", str(SAMPLES / "digits.npz"), "--batch-size", "1"])
    assert small_batch.exit_code == 4 and "raise --batch-size" in small_batch.stderr, small_batch.output
    small_data = runner.invoke(app, [*args, "--data", "two_rows.npz"])
    assert small_data.exit_code == 4 and "too few training rows" in small_data.stderr, small_data.output
    assert sorted(os.listdir()) == ["normed.pt", "two_rows.npz"]


def test_a_tagger_returning_one_row_of_logits_per_token_compresses(workdir):
    """(batch, tokens) ids -> (batch * tokens, classes) logits: more rows than the data gave is the model's
    own layout, not a data error (only fewer rows, a forward regrouping rows of the wrong shape, is)."""
    torch.manual_seed(0)
    torch.save(architectures.flat_tagger().state_dict(), "flat_tagger.pt")
    np.savez("ids.npz", x=np.random.default_rng(0).integers(0, 100, (300, 6)))
    result = runner.invoke(app, ["compress", "flat_tagger.pt", "--arch", "architectures:flat_tagger", "--data", "ids.npz",
                                 "--epochs", "1", "--latency-batch", "4", "--json"])
    assert result.exit_code == 0, result.output
    model = load_compressed_model("flat_tagger.fixclf.pt", arch="architectures:flat_tagger")
    ids = torch.randint(0, 100, (3, 6))
    with torch.no_grad():
        expected = model(ids)
    assert expected.shape == (18, 4)
    assert (torch.from_numpy(run(session("flat_tagger.fixclf.onnx"), ids)) - expected).abs().max() <= 1e-4


def test_a_vit_head_of_more_classes_than_features_stays_dense_and_the_rest_is_replaced():
    """ViT-style, 40 classes on 32 features: the head is fed by the residual stream (no single Linear to
    deepen), so it stays dense with its reason; with 10 classes it is replaced (docs/hard_samples.md,
    ninth round)."""
    example = torch.randn(4, *INPUTS["vit_style"])
    many = {e.name: e for e in make_plan(architectures.vit_style(classes=40).eval(), PlanOptions(), example=example)}
    assert many["head"].kind is None and many["head"].reason.startswith("40 classes on 32 features, fed by no single Linear")
    assert all(entry.kind == "acdc" and entry.options["depth"] == 2 for name, entry in many.items()
               if name not in ("head", "embed"))
    few = make_plan(architectures.vit_style(classes=10).eval(), PlanOptions(), example=example)
    assert [e.kind for e in few if e.role == "head"] == ["hadamard"]
