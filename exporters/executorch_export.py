"""The loss as an ExecuTorch program (model.pte) with the flat parameter vector as its first input.

Lowered with XNNPACK where it delegates, portable kernels otherwise. The batch size is fixed in a
.pte program: the manifest records it as files.pte_batch.
"""
import torch
from torch.func import functional_call


class _FlatLoss(torch.nn.Module):
    def __init__(self, model, loss_fn, entries, n_inputs):
        super().__init__()
        self.model, self.loss_fn, self.entries, self.n_inputs = model, loss_fn, entries, n_inputs

    def forward(self, params, *args):
        state = {e["name"]: params[e["offset"]:e["offset"] + e["size"]].reshape(e["shape"]) for e in self.entries}
        out = functional_call(self.model, state, args[:self.n_inputs])
        return self.loss_fn(out, *args[self.n_inputs:]), out


def write_pte(model, loss_fn, inputs, targets, manifest, path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    named = dict(model.named_parameters())
    flat = torch.cat([named[e["name"]].detach().reshape(-1) for e in manifest["trainable"]])
    wrapper = _FlatLoss(model, loss_fn, manifest["trainable"], len(inputs)).eval()
    program = torch.export.export(wrapper, (flat, *inputs, *targets))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    with open(path, "wb") as f:
        f.write(lowered.buffer)
