"""Built-in architectures: the allow-list of what a checkpoint may name by itself.

:data:`ARCHITECTURES` maps the reference a checkpoint stores (``compressor.zoo:mlp``) to its
factory. A checkpoint naming anything else is refused unless the user names the same
architecture (``--arch`` / ``arch=``); nothing named in a file is ever imported
(see :mod:`compressor.checkpoint`).
"""
from __future__ import annotations

from torch import nn

__all__ = ["ARCHITECTURES", "mlp", "small_cnn"]


def mlp(in_features: int = 64, hidden: tuple[int, ...] | list[int] = (512, 512, 512), num_classes: int = 10) -> nn.Sequential:
    """MLP classifier: Linear + ReLU per hidden width, then the Linear classification layer."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """CaffeNet in miniature for 1 x 8 x 8 images: two conv blocks, then hidden FCs and the classifier."""

    def __init__(self, channels: int = 32, hidden: int = 512, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(2 * channels * 16, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x.reshape(-1, 1, 8, 8)))


def small_cnn(channels: int = 32, hidden: int = 512, num_classes: int = 10) -> SmallCNN:
    return SmallCNN(channels, hidden, num_classes)


ARCHITECTURES = {
    "compressor.zoo:mlp": mlp,
    "compressor.zoo:small_cnn": small_cnn,
}
"""The architectures a checkpoint may name without the user confirming them."""
