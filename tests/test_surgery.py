"""Planning and initialisation on a trained sample: what is replaced, and how it starts."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune

from torch import nn

from compressor.checkpoint import load_model
from compressor.data import load_data
from compressor.errors import PlanError
from compressor.layers import HadamardHead, hadamard_head_limit
from compressor.layers.registry import ALPHA_START
from compressor.options import PlanOptions
from compressor.layers.base import count_stored
from compressor.surgery import _capture_inputs, apply_plan, initialise_from_dense, make_plan, replaced_numbers
from conftest import SAMPLES


@pytest.fixture(scope="module")
def mlp_and_data():
    loaded = load_model(SAMPLES / "mlp.pt")
    return loaded.model, load_data(loaded.data)


def _layer_errors(original, compressed, plan, x):
    hidden = [p.name for p in plan if p.role == "hidden"]
    inputs = _capture_inputs(original, hidden, x)
    with torch.no_grad():
        return [float((compressed.get_submodule(n)(inputs[n]) - original.get_submodule(n)(inputs[n])).norm()
                      / original.get_submodule(n)(inputs[n]).norm()) for n in hidden]


def test_fit_init_approximates_the_dense_layers_better_than_thesis_init(mlp_and_data):
    original, data = mlp_and_data
    plan = make_plan(original)
    errors = {}
    for init in ("thesis", "fit"):
        compressed = apply_plan(copy.deepcopy(original), plan)
        initialise_from_dense(original, compressed, plan, data.head("train", 512)[0], fit=init == "fit")
        errors[init] = _layer_errors(original, compressed, plan, data.head("val", 10**6)[0])
    assert all(f < 0.8 * t for f, t in zip(errors["fit"], errors["thesis"])), errors


def test_head_starts_from_the_original_class_prior(mlp_and_data):
    original, data = mlp_and_data
    plan = make_plan(original)
    compressed = apply_plan(copy.deepcopy(original), plan)
    initialise_from_dense(original, compressed, plan, data.head("train", 512)[0])
    head = compressed.get_submodule(plan[-1].name)
    with torch.no_grad():
        prior = original(data.head("train", 512)[0]).mean(0)
    assert torch.allclose(head.bias, prior, atol=1e-5) and float(head.alpha) == pytest.approx(ALPHA_START)


def test_plan_is_a_pure_function_of_the_model(mlp_and_data):
    original, _ = mlp_and_data
    state = copy.deepcopy(original.state_dict())
    plan = make_plan(original, PlanOptions(hidden="fastfood", include=["2", "4"]))
    assert [(p.name, p.kind) for p in plan] == [("0", None), ("2", "fastfood"), ("4", "hadamard")]
    assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())


def test_bias_free_layers_stay_bias_free():
    model = nn.Sequential(nn.Linear(30, 100, bias=False), nn.ReLU(), nn.Linear(100, 50), nn.ReLU(),
                          nn.Linear(50, 7, bias=False))
    for hidden in ("acdc", "fastfood"):
        plan = make_plan(model, PlanOptions(hidden=hidden))
        assert [p.options["bias"] for p in plan] == [False, True, False]
        compressed = apply_plan(copy.deepcopy(model), plan)
        assert compressed[0](torch.zeros(2, 30)).abs().max() == 0  # no bias anywhere in a bias-free replacement
        assert compressed[4].bias is None
        assert not any("bias" in name for name, _ in compressed[0].named_parameters())


def test_a_model_that_is_one_linear_is_a_head():
    plan = make_plan(nn.Linear(64, 10))
    assert [(p.name, p.role, p.kind) for p in plan] == [("", "head", "hadamard")]
    assert isinstance(apply_plan(nn.Linear(64, 10), plan), HadamardHead)


@pytest.mark.parametrize("n, c", [(3, 7), (4, 15), (5, 20), (8, 255), (10, 1000), (12, 3000)])
def test_hadamard_head_with_more_classes_than_features_is_built_not_searched(n, c):
    head = HadamardHead(n, c, seed=1).double()
    codes = head.code_matrix()
    assert torch.unique(codes.sign(), dim=0).shape[0] == c  # every class its own code, by construction


def test_hadamard_head_beyond_its_limit_is_refused_at_plan_time():
    assert hadamard_head_limit(3) == 7
    with pytest.raises(PlanError, match="--head orthogonal"):
        make_plan(nn.Linear(3, 10))
    with pytest.raises(ValueError):
        HadamardHead(8, 1000)
    orthogonal = make_plan(nn.Linear(3, 10), PlanOptions(head="orthogonal"))
    assert orthogonal[0].kind == "orthogonal"
    # it stores its C x N code (30) and alpha beside the bias: the plan and the report say it compresses nothing
    from compressor.api import _growth_warnings

    assert [orthogonal[0].params_before, orthogonal[0].params_after] == [40, 41]
    assert "fixes the classifier without compressing it" in _growth_warnings(orthogonal)[0]
    assert _growth_warnings(make_plan(nn.Linear(64, 10))) == []


def test_token_inputs_initialise_per_token_row():
    """A (batch, tokens, features) model: calibration activations are flattened to rows."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    plan = make_plan(model)
    compressed = apply_plan(copy.deepcopy(model), plan)
    x = torch.randn(6, 9, 16)
    initialise_from_dense(model, compressed, plan, x)
    assert compressed(x).shape == (6, 9, 5)
    with torch.no_grad():
        prior = model(x).reshape(-1, 5).mean(0)
    assert torch.allclose(compressed[2].bias, prior, atol=1e-5)


def test_initialisation_holds_only_the_activations_it_uses_and_few_rows_of_each(monkeypatch):
    """Without --init fit only the heads read calibration activations; with it, each layer holds at most
    INIT_ROWS token rows, evenly spaced from the first to the last (a ViT's 1,024 images times 197 tokens
    at every Linear would be tens of GB)."""
    from compressor import surgery

    monkeypatch.setattr(surgery, "INIT_ROWS", 10)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    x = torch.randn(6, 9, 16)
    rows = _capture_inputs(model, ["0"], x)["0"]
    assert torch.equal(rows[0], x[0, 0]) and torch.equal(rows[-1], x[-1, -1]) and rows.shape == (10, 16)
    captured = []
    original = surgery.layer_inputs
    monkeypatch.setattr(surgery, "layer_inputs", lambda m, names, *args: captured.append(names) or original(m, names, *args))
    plan = make_plan(model, example=x[:2])
    for fit in (False, True):
        initialise_from_dense(model, apply_plan(copy.deepcopy(model), plan), plan, x, fit=fit)
    assert captured == [["4"], ["0", "2", "4"]]


def test_a_replacement_that_would_store_more_stays_dense():
    plan = make_plan(nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 2)),
                     example=torch.randn(4, 3))
    kept = {p.name: p.reason for p in plan if not p.replaced}
    assert set(kept) == {"0", "2"} and all("acdc form would store" in reason for reason in kept.values())
    assert plan[-1].kind == "hadamard" and plan[-1].params_after < plan[-1].params_before


def test_models_that_cannot_be_distilled_are_refused_before_work():
    with pytest.raises(PlanError, match="1 output"):
        make_plan(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)), example=torch.randn(4, 8))

    class AlwaysDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(8, 64), nn.Linear(64, 5)

        def forward(self, x):
            return self.head(torch.nn.functional.dropout(self.fc(x), 0.5, training=True))

    with pytest.raises(PlanError, match="differs between two runs"):
        make_plan(AlwaysDropout().eval(), example=torch.randn(4, 8))


def test_a_hadamard_head_built_on_meta_draws_its_placement_on_the_cpu():
    """A checkpoint's shape check builds the layers on the meta device; the head's code placement
    (20 classes on 16 features) must still be real and the same as on the CPU."""
    with torch.device("meta"):
        on_meta = HadamardHead(16, 20, seed=3)
    assert on_meta.placement.device.type == "cpu"
    assert torch.equal(on_meta.placement, HadamardHead(16, 20, seed=3).placement)


class _PlainSubclass(nn.Linear):
    """Like timm's ``Linear``: its own forward, the same function."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class _Doubling(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _WithSubclassesAndAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.odd = _PlainSubclass(16, 64), _Doubling(64, 64)
        self.attention = nn.MultiheadAttention(64, 4, batch_first=True)  # reads out_proj's weights itself
        self.head = _PlainSubclass(64, 10)

    def forward(self, x):
        h = torch.relu(self.odd(torch.relu(self.fc(x))))[:, None]
        return self.head(h[:, 0] + self.attention(h, h, h)[0][:, 0])


def test_linear_subclasses_are_replaced_only_when_the_forward_pass_shows_they_are_affine():
    model = _WithSubclassesAndAttention().eval()
    plan = {p.name: p for p in make_plan(model, example=torch.randn(4, 16))}
    assert (plan["fc"].kind, plan["head"].role, plan["head"].kind) == ("acdc", "head", "hadamard")
    assert plan["odd"].kind is None and "_Doubling" in plan["odd"].reason
    assert plan["attention.out_proj"].kind is None and plan["attention.out_proj"].reason == "not called by the forward pass"
    with pytest.raises(PlanError, match="pass --data"):  # without data nothing shows that they are affine
        make_plan(model)
    compressed = apply_plan(copy.deepcopy(model), list(plan.values()))
    assert compressed(torch.randn(3, 16)).shape == (3, 10)


class _TwoHeadsAveraged(nn.Module):
    """DeiT's distilled models in eval mode: two heads on two tokens, averaged; a calibration-free
    bottleneck of the logits' width inside the body, which is not a head."""

    def __init__(self):
        super().__init__()
        self.body, self.bottleneck, self.widen = nn.Linear(8, 32), nn.Linear(32, 5), nn.Linear(5, 32)
        self.head, self.head_dist = nn.Linear(32, 5), nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.widen(torch.relu(self.bottleneck(torch.relu(self.body(x))))))
        return (self.head(h) + self.head_dist(h.flip(-1))) / 2


def test_every_linear_whose_output_reaches_the_logits_directly_is_a_head():
    plan = {p.name: p.role for p in make_plan(_TwoHeadsAveraged().eval(), example=torch.randn(4, 8))}
    assert plan == {"body": "hidden", "bottleneck": "hidden", "widen": "hidden", "head": "head", "head_dist": "head"}
    features = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 16), nn.LayerNorm(16))  # no logits: no head
    assert {p.role for p in make_plan(features.eval(), example=torch.randn(4, 8))} == {"hidden"}
    tokens = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 10), nn.Softmax(-1))  # (batch, tokens, classes)
    assert [p.role for p in make_plan(tokens.eval(), example=torch.randn(4, 7, 8))] == ["hidden", "head"]


class _Probe(nn.Module):
    """Small models of the forward passes the head search must read right (tests below)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.a, self.head, self.aux = nn.Linear(16, 16), nn.Linear(16, 10), nn.Linear(16, 10)
        self.norm = nn.LayerNorm(10)

    def forward(self, x):
        v = self.variant
        if v == "scales_input_in_place":
            x.mul_(0.5)
        h = torch.relu(self.a(x))
        if v == "aux_called_after_head":
            logits = self.head(input=h)  # a keyword call too
            self.aux(h)
            return logits
        if v == "attention_pooling":  # per-class scores weighted by a softmax over tokens of another Linear
            tokens = h[:, None].expand(-1, 3, -1)
            return (self.head(tokens) * torch.softmax(self.aux(tokens), dim=1)).sum(1)
        if v == "feature_extractor":
            return self.norm(self.head(h))
        if v == "residual_projection":  # a's output is both a summand of the output and the body's input
            return self.a(x) + self.head(h).sum(-1, keepdim=True)[:, :1].expand(-1, 16)
        if v == "reused_in_body":  # head applied inside the body and again at the end
            return self.head(torch.relu(self.a(torch.relu(self.a(x)))))
        return self.head(h)


@pytest.mark.parametrize("variant, frozen, heads", [
    ("scales_input_in_place", False, {"head"}),
    ("aux_called_after_head", True, {"head"}),  # frozen: the graph is still recorded
    ("attention_pooling", False, {"head"}),
    ("feature_extractor", True, set()),
    ("residual_projection", False, set()),
    ("reused_in_body", False, {"head"}),
])
def test_the_head_search_reads_the_forward_pass(variant, frozen, heads):
    model = _Probe(variant).train()
    if frozen:
        model.requires_grad_(False)
    example = torch.randn(4, 16)
    copy_of_example = example.clone()
    plan = make_plan(model, example=example)
    assert {p.name for p in plan if p.role == "head"} == heads
    assert torch.equal(example, copy_of_example) and model.training  # neither the rows nor the mode changed
    assert all(p.requires_grad != frozen for p in model.parameters())


def test_a_linear_under_two_names_is_matched_by_either():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(32, 32), nn.Linear(32, 10)
            self.b = self.a

        def forward(self, x):
            return self.head(torch.relu(self.b(torch.relu(self.a(x)))))

    plan = {p.name: p for p in make_plan(Shared().eval(), PlanOptions(exclude=["b"]), example=torch.randn(2, 32))}
    assert set(plan) == {"a", "head"} and plan["a"].reason == "matched by --exclude"


def test_outputs_that_are_not_logits_are_refused():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.proj = nn.Linear(8, 10), nn.Linear(8, 4)

        def forward(self, x):
            return self.head(x), self.proj(x)

    with pytest.raises(PlanError, match="output is tuple"):
        make_plan(Pair().eval(), example=torch.randn(2, 8))
    with pytest.raises(PlanError, match="output is a tensor of shape"):
        make_plan(nn.Sequential(nn.Linear(8, 10), nn.Flatten(0)).eval(), example=torch.randn(2, 8))


def test_layers_called_with_a_keyword_are_initialised_from_their_real_inputs():
    original = _Probe("aux_called_after_head").eval()  # calls self.head(input=h)
    example = torch.randn(8, 16)
    plan = make_plan(original, example=example)
    compressed = apply_plan(copy.deepcopy(original), plan)
    initialise_from_dense(original, compressed, plan, example)
    inputs = _capture_inputs(original, ["head", "a"], example)
    assert inputs["head"].shape == (8, 16) and torch.equal(inputs["a"], example)


def test_nothing_to_replace_names_the_rule_that_kept_the_layers():
    tiny = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3))  # ACDC would store more than 6 numbers
    with pytest.raises(PlanError, match="would store more numbers than its dense layer"):
        make_plan(tiny, PlanOptions(head="keep"))
    with pytest.raises(PlanError, match="relax --include/--exclude or --head/--hidden"):  # the user kept the only Linear
        make_plan(nn.Linear(64, 10), PlanOptions(head="keep"))
    with pytest.raises(PlanError, match="relax --include/--exclude"):
        make_plan(tiny, PlanOptions(exclude=["0"], head="keep"))


class _ReadsItsWeight(nn.Module):
    """The idiom x.to(self.fc.weight.dtype): the model's own code reads a Linear's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(32, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x.to(self.fc.weight.dtype))))


class _Encoder(nn.Module):
    """nn.TransformerEncoderLayer: its inference fast path reads linear1.weight and linear2.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(32, 4, 128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


@pytest.mark.parametrize("model, shape, read", [(_ReadsItsWeight, (32,), {"fc"}),
                                                (_Encoder, (8, 32), {"enc.linear1", "enc.linear2"})])
def test_layers_whose_weight_the_model_reads_stay_dense_and_the_rest_runs(model, shape, read):
    torch.manual_seed(0)
    original, x = model().eval(), torch.randn(4, *shape)
    plan = make_plan(original, example=x[:2])
    kept = {p.name for p in plan if not p.replaced and "reads its .weight directly" in p.reason}
    assert kept == read and any(p.replaced for p in plan)
    compressed = apply_plan(copy.deepcopy(original), plan)
    with torch.no_grad():
        assert compressed.eval()(x).shape == compressed.train()(x).shape == (4, 10)
    with pytest.raises(AttributeError, match="has no 'weight'"):  # what the reads would have met
        next(m for m in compressed.modules() if isinstance(m, HadamardHead)).weight


def test_a_forward_without_gradients_is_refused_before_work():
    class NoGrad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(32, 128), nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.head(torch.relu(self.fc(x)))
    with pytest.raises(PlanError, match="carries no gradient .*leave gradients on in forward"):
        make_plan(NoGrad(), example=torch.randn(2, 32))


def test_when_the_model_reads_every_replaced_weight_the_plan_says_so():
    class ReadsBoth(_ReadsItsWeight):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc(x.to(self.fc.weight.dtype)))
            return self.head(h.to(self.head.weight.dtype))
    with pytest.raises(PlanError, match="the model's own code reads the weights of every Linear"):
        make_plan(ReadsBoth(), example=torch.randn(2, 32))


def test_the_read_check_leaves_other_models_and_the_random_state_alone():
    """A float64 model (the structured layers are built in float32) is planned as before; the check's
    training-mode run (dropout) does not move the caller's random state."""
    model = nn.Sequential(nn.Linear(32, 128), nn.Dropout(0.5), nn.ReLU(), nn.Linear(128, 10)).double()
    torch.manual_seed(3)
    plan = make_plan(model, example=torch.randn(2, 32, dtype=torch.float64))
    assert [p.replaced for p in plan] == [True, True]
    after_plan = torch.rand(1)
    torch.manual_seed(3)
    torch.randn(2, 32, dtype=torch.float64)
    assert torch.equal(after_plan, torch.rand(1))


def test_a_linear_with_forward_hooks_stays_dense_unless_they_only_recompute_its_weight():
    """A forward hook can change what a Linear computes, and its structured replacement would not run it;
    pruning's and weight_norm's hooks only recompute .weight, from which the replacement is initialised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    model[0].register_forward_hook(lambda module, inputs, output: output * 0)
    model[2].register_forward_pre_hook(lambda module, inputs: (inputs[0].flip(-1),))
    torch.nn.utils.prune.random_unstructured(model[4], "weight", 0.3)
    plan = {entry.name: entry for entry in make_plan(model, example=torch.randn(2, 16))}
    assert plan["0"].kind is None and "forward hooks" in plan["0"].reason
    assert plan["2"].kind is None and "forward hooks" in plan["2"].reason
    assert plan["4"].kind == "acdc" and plan["6"].kind == "hadamard"


def test_what_replacing_a_parametrized_linear_frees_includes_its_parametrized_weight():
    """``torch.nn.utils.parametrize`` keeps a Linear's weight in a submodule of it (spectral norm also
    its power-iteration vectors): replacing the Linear frees all of that."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(16, 32)), nn.ReLU(),
                          nn.utils.parametrizations.weight_norm(nn.Linear(32, 32)), nn.ReLU(), nn.Linear(32, 4))
    plan = make_plan(model, example=torch.randn(2, 16))
    assert all(entry.replaced for entry in plan)
    assert replaced_numbers(model, plan) == sum(entry.params_before for entry in plan) == count_stored(model)


def test_a_pattern_equal_to_a_layers_name_finds_it_even_with_brackets():
    """``--include 'layers[0]'`` names the module ``layers[0]`` (a glob alone reads [0] as a character class);
    globs still work as globs."""
    model = nn.Sequential()
    model.add_module("layers[0]", nn.Linear(64, 64))
    model.add_module("relu", nn.ReLU())
    model.add_module("layers[1]", nn.Linear(64, 64))
    model.add_module("out", nn.Linear(64, 10))
    chosen = {p.name for p in make_plan(model, PlanOptions(include=["layers[0]"], head="keep")) if p.replaced}
    assert chosen == {"layers[0]"}
    globbed = {p.name for p in make_plan(model, PlanOptions(include=["layers?1]"], head="keep")) if p.replaced}
    assert globbed == {"layers[1]"}


def test_planning_a_model_with_reentrant_checkpointing_prints_no_torch_warning():
    """The plan's gradient-free training-mode probe makes torch.utils.checkpoint(use_reentrant=True) warn
    "None of the inputs have requires_grad"; that warning is the probe's, not the user's to read."""
    import warnings

    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Sequential(nn.Linear(16, 64), nn.ReLU()), nn.Linear(64, 4)

        def forward(self, x):
            h = checkpoint(self.body, x, use_reentrant=True) if self.training else self.body(x)
            return self.head(h)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = make_plan(Checkpointed().eval(), PlanOptions(), example=torch.randn(8, 16))
    assert any(entry.replaced for entry in plan)
    assert not [str(w.message) for w in caught if "requires_grad" in str(w.message)]


class _Residual(nn.Module):
    """A head fed by a sum of two Linears (a transformer's residual stream in miniature)."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x)) + self.b(x))


@pytest.mark.parametrize("classes, feeder_depth", [(40, 2), (64, 2), (65, 4), (300, 10)])
def test_the_stack_feeding_a_head_of_more_classes_than_features_is_deeper(classes, feeder_depth):
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, classes))
    plan = make_plan(model, PlanOptions(), example=torch.randn(4, 16))
    depths = [entry.options.get("depth") for entry in plan]
    assert depths == [2, feeder_depth, None]  # ceil(C / 64) times the default depth, the feeder only
    assert ("feeds a fixed head" in plan[1].reason) == (feeder_depth > 2)
    assert plan[1].params_after == count_stored(plan[1].build()) < plan[1].params_before
    assert [e.options.get("depth") for e in make_plan(model, PlanOptions(depth=3), example=torch.randn(4, 16))][1] \
        == 3 * feeder_depth // 2


def test_no_stack_is_deepened_without_a_fixed_head_of_more_classes_or_without_data():
    wide = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 300))
    example = torch.randn(4, 16)
    assert make_plan(wide, PlanOptions(head="keep"), example=example)[0].options["depth"] == 2
    assert make_plan(wide, PlanOptions(exclude=["2"]), example=example)[0].options["depth"] == 2
    assert make_plan(wide, PlanOptions())[0].options["depth"] == 2  # without data the feeder is unknown
    assert make_plan(wide, PlanOptions())[1].kind == "hadamard"


def test_a_head_of_more_classes_than_features_without_a_feeder_to_deepen_stays_dense_and_says_why():
    """Fed by a residual sum of two Linears, or by a Fastfood stack (no depth), a head of 300 classes on
    64 features keeps its dense form; the rest of the plan is unchanged. A dense feeder needs no depth."""
    residual = make_plan(_Residual(64, 300), PlanOptions(), example=torch.randn(4, 64))
    assert [(e.name, e.kind, e.options.get("depth")) for e in residual] == [("a", "acdc", 2), ("b", "acdc", 2),
                                                                           ("head", None, None)]
    assert residual[2].reason.startswith("300 classes on 64 features, fed by no single Linear")
    assert residual[2].params_after == residual[2].params_before
    wide = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 300))
    fastfood = make_plan(wide, PlanOptions(hidden="fastfood"), example=torch.randn(4, 16))
    assert [e.kind for e in fastfood] == ["fastfood", None]
    assert "fed by 0, a fastfood stack, which cannot be made deeper (--hidden acdc can)" in fastfood[1].reason
    assert [e.kind for e in make_plan(wide, PlanOptions(exclude=["0"]), example=torch.randn(4, 16))] == [None, "hadamard"]
    assert [e.kind for e in make_plan(_Residual(64, 40), PlanOptions(), example=torch.randn(4, 64))] == ["acdc"] * 2 + ["hadamard"]


class _InputResidual(nn.Module):
    """head(s * x + fc2(relu(fc1(x)))): the model's input reaches the head past every Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 100)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x.mul_(1.0)  # an in-place change of the input still traces
        return self.head(self.scale * x + self.fc2(torch.relu(self.fc1(x))))


def test_a_residual_from_the_models_input_means_no_single_feeder():
    plan = make_plan(_InputResidual(), PlanOptions(), example=torch.randn(4, 32))
    assert [(e.kind, e.options.get("depth")) for e in plan] == [("acdc", 2), ("acdc", 2), (None, None)]
    assert "fed by no single Linear" in plan[2].reason


def test_a_wide_head_kept_for_its_fastfood_feeder_stays_dense_when_a_budget_keeps_the_feeder():
    """--objective latency or --max-drop keeping the Fastfood feeder dense must not bring the head back."""
    wide = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 300))
    plan = make_plan(wide, PlanOptions(hidden="fastfood"), example=torch.randn(4, 16), keep={"0": "slower than dense"})
    assert [(e.kind, e.reason.split(",")[0]) for e in plan] == [(None, "slower than dense"), (None, "300 classes on 64 features")]


def test_heads_left_alone_by_the_users_patterns_are_told_apart_from_a_model_with_nothing_to_compress():
    with pytest.raises(PlanError, match="relax --include/--exclude or --hidden$"):
        make_plan(_Residual(64, 300), PlanOptions(include=["head"]), example=torch.randn(4, 64))


def test_a_model_whose_only_linear_is_a_head_without_a_feeder_has_nothing_to_replace():
    convolved = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 300))
    with pytest.raises(PlanError, match="only heads of more classes than features are left"):
        make_plan(convolved, PlanOptions(), example=torch.randn(4, 1, 16))


def test_a_stack_feeding_a_head_kept_dense_later_keeps_its_usual_depth():
    """``--objective latency`` or ``--max-drop`` may keep the head dense after the plan was made: the stack
    that was deepened to feed it goes back to ``--depth``, and its note with it."""
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 300))
    example = torch.randn(4, 16)
    assert make_plan(model, PlanOptions(), example=example)[1].options["depth"] == 10
    plan = make_plan(model, PlanOptions(), example=example, keep={"4": "slower than dense"})
    assert [(e.kind, e.options.get("depth"), e.reason) for e in plan] == [
        ("acdc", 2, ""), ("acdc", 2, ""), (None, None, "slower than dense")]
    assert plan[1].params_after == count_stored(plan[1].build())


class _Between(nn.Module):
    """A Linear, then something that mixes features, then a head of 300 classes on 64 features."""

    def __init__(self, between: str) -> None:
        super().__init__()
        self.between, self.fc, self.head = between, nn.Linear(64, 64), nn.Linear(64, 300)
        self.lstm, self.conv, self.w = nn.LSTM(64, 64, batch_first=True), nn.Conv1d(64, 64, 1), nn.Parameter(torch.randn(64, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.between == "lstm":
            h = self.lstm(h)[0][:, -1]
        elif self.between == "conv":
            h = self.conv(h.unsqueeze(-1)).squeeze(-1)
        elif self.between == "matmul":
            h = h @ self.w
        elif self.between == "fft":
            h = torch.fft.fft(h).real
        elif self.between == "cumsum":
            h = torch.cumsum(h, -1)
        return self.head(torch.relu(h))


@pytest.mark.parametrize("between", ["lstm", "conv", "matmul", "fft", "cumsum"])
def test_a_linear_behind_another_linear_map_is_not_the_heads_feeder(between):
    x = torch.randn(4, 5, 64) if between == "lstm" else torch.randn(4, 64)
    plan = make_plan(_Between(between), PlanOptions(), example=x)
    assert plan[0].options["depth"] == 2 and plan[1].kind is None and "fed by no single Linear" in plan[1].reason


def test_a_feeder_is_made_only_as_deep_as_stores_fewer_numbers_than_its_dense_layer():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2000))
    feeder = make_plan(model, PlanOptions(), example=torch.randn(4, 16))[1]
    deeper = feeder.spec.make(64, 64, {**feeder.options, "depth": feeder.options["depth"] + 1})
    assert 2 < feeder.options["depth"] < 64 and "wanted 64" in feeder.reason
    assert feeder.params_after < feeder.params_before <= count_stored(deeper)


class _TwoHeadsApartInTraining(nn.Module):
    """DeiT's distillation training: evaluation averages two heads; training returns them apart, the
    second as an auxiliary output the fine-tune's loss leaves out."""

    def __init__(self, second_in_training: bool = False) -> None:
        super().__init__()
        self.fc1, self.head, self.head_dist = nn.Linear(64, 128), nn.Linear(128, 10), nn.Linear(128, 10)
        self.second_in_training = second_in_training

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.fc1(x))
        if self.training and not self.second_in_training:
            return self.head(h), self.head_dist(h)
        return (self.head(h) + self.head_dist(h)) / 2


def test_a_layer_the_training_mode_logits_do_not_reach_stays_dense():
    """Fine-tuning trains what the training-mode logits reach: a head the evaluation output averages in
    but training returns apart would keep its fixed start forever if replaced, so it stays dense, with
    its reason; the same model returning the average in both modes has both heads replaced. The
    caller's model and random state are left as they were."""
    torch.manual_seed(0)
    model, x = _TwoHeadsApartInTraining(), torch.randn(2, 64)
    state, rng, mode = copy.deepcopy(model.state_dict()), torch.get_rng_state(), model.training
    plan = {entry.name: entry for entry in make_plan(model, example=x)}
    assert plan["head_dist"].kind is None and "would never train" in plan["head_dist"].reason
    assert plan["head"].kind == "hadamard" and plan["fc1"].kind == "acdc"
    assert torch.equal(torch.get_rng_state(), rng) and model.training == mode
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    averaged = {entry.name: entry.kind for entry in make_plan(_TwoHeadsApartInTraining(True), example=x)}
    assert averaged == {"fc1": "acdc", "head": "hadamard", "head_dist": "hadamard"}
    with pytest.raises(PlanError, match="training-mode forward do not reach the Linears left to replace"):
        make_plan(model, PlanOptions(include=["head_dist"]), example=x)


def test_nothing_left_because_the_model_reads_some_weights_and_training_skips_the_rest_names_both():
    """The head's weight is read by the model's own code and the auxiliary head is returned apart from
    the logits in training: the refusal names both causes, not a generic "relax --include"."""
    class ReadsHeadAuxApart(_TwoHeadsApartInTraining):
        def forward(self, x: torch.Tensor):
            h = torch.relu(self.fc1(x)).to(self.head.weight.dtype)
            return (self.head(h), self.head_dist(h)) if self.training else (self.head(h) + self.head_dist(h)) / 2
    with pytest.raises(PlanError, match="reads the weights of some Linears .* do not reach the others"):
        make_plan(ReadsHeadAuxApart(), PlanOptions(include=["head", "head_dist"]), example=torch.randn(2, 64))
