"""Network architectures of the models this project trains itself (the weights live in model packages)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

BlockFactory = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride) -> block


def _conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv3d(out_channels, out_channels, 3, padding=1),
        nn.LeakyReLU(0.1, inplace=True),
    )


def _normalised_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.InstanceNorm3d(out_channels, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.InstanceNorm3d(out_channels, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class _UNetBody(nn.Module):
    """Encoder (strided-conv downsampling), decoder (transposed-conv upsampling, skip concatenation) and a 1x1 head.

    The attribute names (encoders, upsamplers, decoders, head) are the keys of the shipped state dicts: keep them.
    """

    def __init__(self, in_channels: int, out_channels: int, features: Sequence[int], block: BlockFactory) -> None:
        super().__init__()
        features = [int(value) for value in features]
        self.in_channels = in_channels
        self.features = features
        self.encoders = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(features):
            self.encoders.append(block(previous, width, 1 if level == 0 else 2))
            previous = width
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(features[:-1]):
            self.upsamplers.append(nn.ConvTranspose3d(previous, width, 2, stride=2))
            self.decoders.append(block(2 * width, width, 1))
            previous = width
        self.head = nn.Conv3d(previous, out_channels, 1)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.features) - 1)

    def _head_input(self, inputs: torch.Tensor) -> torch.Tensor:
        skips = []
        hidden = inputs
        for encoder in self.encoders:
            hidden = encoder(hidden)
            skips.append(hidden)
        skips.pop()
        for upsample, decoder in zip(self.upsamplers, self.decoders):
            hidden = decoder(torch.cat([skips.pop(), upsample(hidden)], dim=1))
        return hidden


class ResidualUNet3D(_UNetBody):
    """A small 3D U-Net that predicts a correction added to its first input channel.

    Used for super-resolution: channel 0 is the thick-slice image already interpolated onto the 1 mm grid, so the
    network only has to learn what interpolation misses. No normalisation layers, because intensities carry the
    signal; the residual is added in float32 so bf16 autocast does not quantise the image itself.
    Spatial sizes must be divisible by 2 ** (len(features) - 1).
    """

    def __init__(self, in_channels: int = 3, features: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__(in_channels, 1, features, _conv_block)
        nn.init.zeros_(self.head.weight)  # an untrained network returns its input: training starts from interpolation
        nn.init.zeros_(self.head.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs[:, :1].float() + self.head(self._head_input(inputs)).float()


class UNet3D(_UNetBody):
    """A 3D U-Net segmenter (nnU-Net-like blocks: conv, InstanceNorm, LeakyReLU; strided-conv downsampling,
    transposed-conv upsampling) that returns float32 logits, one channel per class.

    InstanceNorm rather than batch norm because it trains with batch 1 and makes the features independent of the
    input's intensity scale, which a contrast-agnostic segmenter wants. Spatial sizes must be divisible by
    2 ** (len(features) - 1).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 4,
                 features: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__(in_channels, out_channels, features, _normalised_block)
        self.out_channels = out_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self._head_input(inputs)).float()


class SequenceClassifierNet(nn.Module):
    """A small 3D CNN that names a volume's type from a GRID_SIZE³ input (engine/classification.py).

    A strided stem, then per level a strided conv and a conv (BatchNorm, LeakyReLU), global average and max pooling
    and one linear layer. Batch norm rather than instance norm on purpose: the Hounsfield channels carry absolute
    levels (CT's air, brain and bone values) that per-volume normalisation would erase. `saliency_layer` names the
    8³ level MONAI's Grad-CAM hooks (fine enough to point at a region, coarse enough to be stable)."""

    saliency_layer = "levels.1"

    def __init__(self, in_channels: int = 3, classes: int = 8, features: Sequence[int] = (16, 32, 64, 128, 160)
                 ) -> None:
        super().__init__()
        features = [int(value) for value in features]
        self.features = features

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(cout),
                nn.LeakyReLU(0.1, inplace=True),
                nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.LeakyReLU(0.1, inplace=True))

        self.stem = nn.Sequential(nn.Conv3d(in_channels, features[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm3d(features[0]), nn.LeakyReLU(0.1, inplace=True))
        self.levels = nn.ModuleList(block(features[index], features[index + 1], 2)
                                    for index in range(len(features) - 1))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(2 * features[-1], classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(inputs)
        for level in self.levels:
            hidden = level(hidden)
        pooled = torch.cat([hidden.mean(dim=(2, 3, 4)), hidden.amax(dim=(2, 3, 4))], dim=1)
        return self.head(self.dropout(pooled)).float()
