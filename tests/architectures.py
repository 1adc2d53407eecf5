"""Test-local models with the shapes of real architectures (torchvision's plain wheel does not import
next to the CPU torch, so these reproduce what matters to fixclf): a ResNet-style CNN (conv +
BatchNorm + ``fc`` head), a ViT-style encoder on (batch, tokens, features) with qkv / proj / MLP
Linears, and an MLP-Mixer whose token-mixing Linears act across the token axis."""
from __future__ import annotations

import os
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class ResNetStyle(nn.Module):
    """conv-BN-ReLU x2, global pooling, an FC hidden layer and the ``fc`` head; 1 x 8 x 8 inputs."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.hidden = nn.Linear(width * 4, 64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x.reshape(-1, 1, 8, 8))))
        x = F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(x))), 2).flatten(1)
        return self.fc(F.relu(self.hidden(x)))


class Block(nn.Module):
    """Pre-norm transformer block: attention (qkv, proj) and MLP (fc1, fc2)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTStyle(nn.Module):
    """(batch, tokens, patch features) -> patch embedding, position embedding (which fixes the token
    count; ``tokens=None``: none, any count), one block, mean pool, head."""

    def __init__(self, tokens: int | None = 16, patch: int = 4, dim: int = 32, heads: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(patch, dim)
        self.pos = nn.Parameter(torch.randn(tokens, dim) * 0.02) if tokens else nn.Parameter(torch.zeros(dim))
        self.block = Block(dim, heads)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.embed(x) + self.pos)).mean(1))


class MixerStyle(nn.Module):
    """MLP-Mixer layer: a token-mixing Linear across the token axis, a channel-mixing Linear, head."""

    def __init__(self, tokens: int = 16, patch: int = 4, dim: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(patch, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mix = nn.Linear(tokens, tokens)
        self.channel_mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + F.gelu(self.channel_mix(self.norm2(x)))
        return self.head(x.mean(1))


def resnet_style(width: int = 16, classes: int = 10) -> ResNetStyle:
    return ResNetStyle(width, classes)


def vit_style(classes: int = 10) -> ViTStyle:
    return ViTStyle(classes=classes)


def any_length_tokens(classes: int = 10) -> ViTStyle:
    """A transformer block on (batch, tokens, 4) features of any token count (no position embedding)."""
    return ViTStyle(tokens=None, classes=classes)


def mixer_style(classes: int = 10) -> MixerStyle:
    return MixerStyle(classes=classes)


def one_sensitive_layer(classes: int = 3) -> nn.Sequential:
    """8 -> 32 (a random projection), ReLU, 32 -> 32, head 32 -> classes. Saved with the 32 -> 32 layer
    set to the identity, it is the one layer that a near-identity structured layer replaces almost
    for free, while replacing the random projection costs most of the accuracy (``--max-drop`` test)."""
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, classes))


class Tangled(nn.Module):
    """What registration order gets wrong: the head registered first, a hidden Linear registered under
    two names (``block`` and ``again``, applied twice), and an auxiliary Linear registered last that
    the forward pass never calls; 20 classes on 16 features (more code rows than a Hadamard matrix
    of the features' order has)."""

    def __init__(self, classes: int = 20) -> None:
        super().__init__()
        self.head = nn.Linear(16, classes)
        self.embed = nn.Linear(8, 16)
        self.block = nn.Linear(16, 16)
        self.again = self.block
        self.aux = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.block(F.relu(self.embed(x))))
        return self.head(F.relu(self.again(x)))


def tangled(classes: int = 20) -> Tangled:
    return Tangled(classes)


class TokenClassifier(nn.Module):
    """Integer token ids (batch, tokens) -> nn.Embedding -> mean over tokens -> two hidden Linears -> head."""

    def __init__(self, vocabulary: int = 100, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, dim)
        self.fc1, self.fc2, self.head = nn.Linear(dim, 64), nn.Linear(64, 64), nn.Linear(64, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).mean(1)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def token_classifier(classes: int = 4) -> TokenClassifier:
    return TokenClassifier(classes=classes)


class RecurrentTokens(nn.Module):
    """Token features (batch, tokens, 8) -> Linear on each token -> GRU -> head on its last state:
    any sequence length runs."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.embed, self.rnn, self.head = nn.Linear(8, 32), nn.GRU(32, 32, batch_first=True), nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(F.relu(self.embed(x)))[1][-1])


class ByteImages(nn.Module):
    """uint8 images (batch, 1, 8, 8) that the model scales itself (``x / 255`` on bytes; floats are taken as
    already scaled): a conv block, a hidden Linear and the head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc, self.head = nn.Linear(8 * 64, 128), nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return self.head(F.relu(self.fc(F.relu(self.conv(x.reshape(-1, 1, 8, 8))).flatten(1))))


def byte_images(classes: int = 10) -> ByteImages:
    return ByteImages(classes)


class SharedWeight(nn.Module):
    """Two distinct Linears sharing one weight tensor (not one module under two names): ``c.weight is
    b.weight``, their biases their own."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.c.weight = self.b.weight
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))))


def shared_weight(classes: int = 5) -> SharedWeight:
    return SharedWeight(classes)


class BranchesOnData(nn.Module):
    """Runs in PyTorch, but its forward branches on the values of its input, which torch.export
    cannot trace: a model fixclf must refuse before it fine-tunes anything."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.head = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.hidden(x))
        if bool(h.sum() > 0):
            h = h * 2
        return self.head(h)


def branches_on_data() -> BranchesOnData:
    return BranchesOnData()


class BranchesOnShape(ViTStyle):
    """The any-length token block whose forward doubles its features when ``x.shape[axis] > above``:
    the exporter keeps the branch the example took, so a file would answer differently at sizes on
    the other side (an ``if`` on the batch size or on the token count)."""

    def __init__(self, axis: int, above: int, classes: int = 10) -> None:
        super().__init__(tokens=None, classes=classes)
        self.axis, self.above = axis, above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        if x.shape[self.axis] > self.above:
            h = h * 2
        return self.head(self.norm(self.block(h)).mean(1))


class TokenConvolution(nn.Module):
    """A convolution of width 3 across the tokens of (batch, tokens, 4) features: it needs 3 tokens,
    in PyTorch as in ONNX."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv1d(4, 16, 3), nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x.transpose(1, 2))).mean(2))


class FlatTagger(TokenClassifier):
    """A token tagger whose logits are one row per token: (batch * tokens, classes)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).reshape(-1, self.embed.embedding_dim)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def flat_tagger(classes: int = 4) -> FlatTagger:
    return FlatTagger(classes=classes)


def lazy_mlp() -> nn.Sequential:
    """Sizes known only after a first call: fixclf could not rebuild a compressed model from this."""
    return nn.Sequential(nn.LazyLinear(64), nn.ReLU(), nn.Linear(64, 10))


class AuxInTraining(nn.Module):
    """GoogLeNet / Inception style: the logits in evaluation mode, ``(logits, aux)`` in training mode, the
    auxiliary head on an earlier layer's features (``first="features"``: a training-mode tuple whose
    first element is not the logits)."""

    def __init__(self, classes: int = 10, first: str = "logits") -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 128)
        self.aux, self.head = nn.Linear(128, classes), nn.Linear(128, classes)
        self.first = first

    def forward(self, x: torch.Tensor):
        features = F.relu(self.fc1(x))
        logits = self.head(F.relu(self.fc2(features)))
        if not self.training:
            return logits
        return (logits, self.aux(features)) if self.first == "logits" else (features, logits)


def aux_in_training(classes: int = 10, first: str = "logits") -> AuxInTraining:
    return AuxInTraining(classes, first)


def softmax_mlp(classes: int = 10) -> nn.Sequential:
    """A classifier whose forward ends in softmax: it returns probabilities, not logits."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes), nn.Softmax(-1))


def normalised_logits(classes: int = 10) -> nn.Sequential:
    """The last Linear's output goes through a BatchNorm: by design not a head (not logits yet)."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes), nn.BatchNorm1d(classes))


def long_names(classes: int = 10) -> nn.Sequential:
    """Two Linears whose names differ only after 60 characters."""
    stem = "a_really_long_layer_name_" * 3
    return nn.Sequential(OrderedDict([(f"{stem}one", nn.Linear(64, 64)), ("relu", nn.ReLU()),
                                      (f"{stem}two", nn.Linear(64, classes))]))


class CachesInEval(nn.Module):
    """LeViT's habit: in eval mode a computed tensor (its attention biases) is cached on the module, so
    a forward with gradients on leaves a non-leaf tensor there; train() and eval() clear the cache."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, classes)
        self.gain = nn.Parameter(torch.ones(64))
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> "CachesInEval":  # as LeViT's: either mode clears the cache
        super().train(mode)
        self.cache = {}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = self.gain * 2 if self.training else self.cache.setdefault("gain", self.gain * 2)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)) * gain)))


def caches_in_eval(classes: int = 10) -> CachesInEval:
    return CachesInEval(classes)


class RunningVariance(nn.Module):
    """timm's EvoNorm B0 in brief: a running variance (a buffer not of a PyTorch norm class) updated by
    every training-mode forward, and a dropout inside it."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("running_var", torch.ones(features))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.running_var.lerp_(x.detach().var(0), 0.1)
            return self.drop(x / (x.var(0) + 1e-5).sqrt())
        return x / (self.running_var + 1e-5).sqrt()


class RunningRoot(nn.Module):
    """Running statistics held by the model itself: a running mean of the inputs (a buffer) and a
    moving variance (a parameter without gradient, as Keras ports hold it), both updated by every
    training-mode forward, which also applies dropout."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(16))
        self.moving_var = nn.Parameter(torch.ones(16), requires_grad=False)
        self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.running_mean.lerp_(x.detach().mean(0), 0.1)
            self.moving_var.data.lerp_(x.detach().var(0), 0.1)
        x = F.dropout((x - self.running_mean) / self.moving_var.sqrt(), 0.1, self.training)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def running_root(classes: int = 10) -> RunningRoot:
    return RunningRoot(classes)


def running_variance(classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 64), RunningVariance(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, classes))


class ExitsOnRankOne(nn.Module):
    """The digits MLP's shape; under torchrun, the process of rank 1 calls sys.exit(0) in its 10th
    training forward (one process only: the others must still hear of it)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc = nn.Linear(256, classes)
        self.calls = 0

    def forward(self, x):
        self.calls += self.training
        if self.calls == 10 and os.environ.get("RANK") == "1":
            sys.exit(0)
        return self.fc(torch.relu(self.fc1(x)))
