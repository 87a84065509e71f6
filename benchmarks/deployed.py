"""Architectures people deploy, in plain torch (torchvision has no CPU build here), exported as a user's tool
would (torch's TorchScript exporter, opset 17, dynamic batch): for the engine's tests and step_speed.py.

mobilenetv3_small: MobileNetV3-small's layout (depthwise convs, HardSwish, squeeze-excitation with
HardSigmoid and Mul, BatchNorm, a Linear-HardSwish-Linear head); `width` scales every channel count.
resnet18: ResNet-18's layout (7x7 stem, padded MaxPool, 4 stages of 2 basic blocks, global average pool, fc).
transformer: an encoder classifier over [N, seq, features] (pre-LayerNorm blocks, attention MatMuls, Softmax,
Transpose, GELU, mean over the sequence, a Linear head).
Each model names its parts so that selections can be written as globs: "head" (the last Linear), "block"
(the last block, with the head), "all".
"""
import math

import torch
from torch import nn


def _div8(c):
    return max(8, int(c + 4) // 8 * 8)


def _conv_bn(c_in, c_out, k, stride=1, groups=1, act=nn.Hardswish):
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, _div8(c / 4), 1), nn.Conv2d(_div8(c / 4), c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * nn.functional.hardsigmoid(self.fc2(nn.functional.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, c_in, k, expand, c_out, se, act, stride):
        super().__init__()
        layers = [] if expand == c_in else [_conv_bn(c_in, expand, 1, act=act)]
        layers += [_conv_bn(expand, expand, k, stride, groups=expand, act=act)]
        layers += [SqueezeExcite(expand)] if se else []
        layers += [_conv_bn(expand, c_out, 1, act=None)]
        self.body, self.residual = nn.Sequential(*layers), stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


# kernel, expanded channels, output channels, squeeze-excitation, activation, stride (the paper's Table 2)
_V3_SMALL = [(3, 16, 16, True, nn.ReLU, 2), (3, 72, 24, False, nn.ReLU, 2), (3, 88, 24, False, nn.ReLU, 1),
             (5, 96, 40, True, nn.Hardswish, 2), (5, 240, 40, True, nn.Hardswish, 1),
             (5, 240, 40, True, nn.Hardswish, 1), (5, 120, 48, True, nn.Hardswish, 1),
             (5, 144, 48, True, nn.Hardswish, 1), (5, 288, 96, True, nn.Hardswish, 2),
             (5, 576, 96, True, nn.Hardswish, 1), (5, 576, 96, True, nn.Hardswish, 1)]


class MobileNetV3Small(nn.Module):
    def __init__(self, classes=10, width=1.0, hidden=1024):
        super().__init__()
        c = _div8(16 * width)
        self.stem, blocks = _conv_bn(3, c, 3, 2), []
        for k, e, o, se, act, s in _V3_SMALL:
            blocks.append(InvertedResidual(c, k, _div8(e * width), _div8(o * width), se, act, s))
            c = _div8(o * width)
        self.blocks = nn.Sequential(*blocks)
        self.last = _conv_bn(c, 6 * c, 1)
        self.pre = nn.Linear(6 * c, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x))).mean((2, 3))
        return self.head(nn.functional.hardswish(self.pre(x)))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.down = None if stride == 1 and c_in == c_out else \
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, classes=10, width=64):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 7, 2, 3, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, c = [], w[0]
        for i, c_out in enumerate(w):
            blocks += [BasicBlock(c, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class EncoderBlock(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.ff1, self.ff2 = nn.LayerNorm(d), nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        n, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, s, d))
        return x + self.ff2(nn.functional.gelu(self.ff1(self.norm2(x))))


class Transformer(nn.Module):
    def __init__(self, features=16, classes=10, d=64, heads=4, ff=128, depth=2, seq=32):
        super().__init__()
        self.embed = nn.Linear(features, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(d, heads, ff) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x) + self.pos)).mean(1))


def build(name, **kwargs):
    """(module in eval mode with non-trivial BatchNorm statistics, input shape without the batch)."""
    torch.manual_seed(kwargs.pop("seed", 0))
    side = kwargs.pop("side", 64)
    if name == "mobilenetv3_small":
        model, shape = MobileNetV3Small(**kwargs), (3, side, side)
    elif name == "resnet18":
        model, shape = ResNet18(**kwargs), (3, side, side)
    elif name == "transformer":
        model = Transformer(**kwargs)
        shape = (model.pos.shape[1], model.embed.in_features)
    else:
        raise ValueError(f"unknown model {name!r}: mobilenetv3_small, resnet18, transformer")
    for m in model.modules():  # deployed norms carry learned values, not 0 / 1 (which the exporter would also
        if isinstance(m, nn.BatchNorm2d):  # merge into one shared initializer)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model.eval(), shape


def export(name, path, **kwargs):
    """The model as a deployed ONNX file (TorchScript exporter, opset 17, BatchNorm kept, dynamic batch);
    returns its input shape without the batch."""
    model, shape = build(name, **kwargs)
    torch.onnx.export(model, (torch.zeros(2, *shape),), str(path), dynamo=False, opset_version=17,
                      do_constant_folding=False, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return shape


SELECTIONS = {  # name -> {selection: trainable globs}
    "mobilenetv3_small": {"head": ["head.*"], "block": ["blocks.10.*", "last.*", "pre.*", "head.*"], "all": ["*"]},
    "resnet18": {"head": ["head.*"], "block": ["blocks.7.*", "head.*"], "all": ["*"]},
    "transformer": {"head": ["head.*"], "block": ["blocks.1.*", "norm.*", "head.*"], "all": ["*"]},
}
