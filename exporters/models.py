"""Built-in models of the paper and the benchmarks (torch side)."""
import torch
from torch import nn


def sarcos_mlp():
    """MLP 21-64-64-64-32-7 with ReLU: 12,039 parameters (SARCOS inverse dynamics)."""
    sizes = [21, 64, 64, 64, 32, 7]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mnist_cnn():
    """conv(1->8)-ReLU-pool-conv(8->16)-ReLU-pool-conv(16->32)-ReLU-flatten-linear(1568->10): 21,578 params."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(1568, 10))


def paper_cnn(in_channels=1, side=28, activation=nn.ReLU):
    """The paper's 3-conv + 1-FC CNN, pinned by its two budget percentages (the authors publish no code):
    conv(c->12)-ReLU-pool-conv(12->20)-ReLU-pool-conv(20->64)-ReLU-pool-flatten-linear(64*s*s->10), 3x3 pad 1,
    max-pool 2 after every conv (28 -> 14 -> 7 -> 3; 32 -> 16 -> 8 -> 4).
    MNIST (1x28x28): 120 + 2,180 + 11,584 + (576*10 + 10 = 5,770) = 19,654 weights; B = 256 is 1.30%
    ("about 1.3%"). CIFAR-10 (3x32x32): 336 + 2,180 + 11,584 + (1024*10 + 10 = 10,250) = 24,350; B = 1024 is
    4.21% ("about 4.2%"). mnist-cnn (21,578 weights) gives 1.19% and 3.86%."""
    s = side // 2 // 2 // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 12, 3, padding=1), activation(), nn.MaxPool2d(2),
        nn.Conv2d(12, 20, 3, padding=1), activation(), nn.MaxPool2d(2),
        nn.Conv2d(20, 64, 3, padding=1), activation(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * s * s, 10))


def paper_cnn_leaky():
    """paper-cnn with LeakyReLU(0.01): a channel cannot die (its finite differences never all vanish), which
    tests whether dead ReLU channels are what makes CoCD at gamma 0.99 collapse. Same 19,654 weights."""
    return paper_cnn(activation=lambda: nn.LeakyReLU(0.01))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for 32x32x3 inputs (He et al. 2016, CIFAR variant, 1x1 projection shortcuts)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


BUILTIN = {
    "sarcos-mlp": (sarcos_mlp, (21,), "mse", (7,)),
    "mnist-cnn": (mnist_cnn, (1, 28, 28), "cross_entropy", ()),
    "paper-cnn": (paper_cnn, (1, 28, 28), "cross_entropy", ()),
    "paper-cnn-leaky": (paper_cnn_leaky, (1, 28, 28), "cross_entropy", ()),
    "resnet20": (ResNet20, (3, 32, 32), "cross_entropy", ()),
}


def builtin(name, seed=0, batch=4):
    """(model, example_inputs, example_targets, loss) for a built-in model name."""
    if name not in BUILTIN:
        from ..runtime.errors import EdgezoError
        raise EdgezoError(f"--model must be one of {sorted(BUILTIN)}, got {name!r}")
    make, in_shape, loss, target_shape = BUILTIN[name]
    torch.manual_seed(seed)
    model = make().eval()
    x = torch.randn(batch, *in_shape)
    y = torch.randn(batch, *target_shape) if loss == "mse" else torch.randint(0, 10, (batch,))
    return model, x, y, loss
