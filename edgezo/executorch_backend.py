"""Training through an ExecuTorch program (model.pte) with ExecuTorch's Python runtime.

That runtime loads torch's libraries, so this backend lives outside the torch-free runtime/. The
program computes (loss, output) from the flat params and a batch of the size it was exported with
(manifest pte_batch); evaluation of other batch sizes (validation) goes through the artifact's
loss.onnx in onnxruntime.
"""
import numpy as np
import torch

from .runtime.artifact import Artifact
from .runtime.errors import EdgezoError


class ExecutorchArtifact(Artifact):
    backend = "executorch"

    def __init__(self, path, device="auto", threads=None):
        super().__init__(path, device="cpu", threads=threads, engine="naive")
        if "pte" not in self.manifest["files"] or not self.file("pte").is_file():
            raise EdgezoError(f"artifact {self.path} has no model.pte; export it with formats=('onnx', 'pte')")
        from executorch.runtime import Runtime
        try:
            program = Runtime.get().load_program(str(self.file("pte")))
            self.method = program.load_method("forward")
        except Exception as e:  # ExecuTorch raises RuntimeError / ValueError for damaged programs
            raise EdgezoError(f"{self.file('pte')}: ExecuTorch cannot load it ({str(e)[:200]})") from None
        self.fixed_batch = self.manifest.get("pte_batch")
        meta = self.method.metadata
        n_in = meta.num_inputs()
        expected = 1 + len(self.input_names) + len(self.target_names)
        shape = list(meta.input_tensor_meta(0).sizes()) if n_in else None
        if n_in != expected or shape != [self.num_params]:
            raise EdgezoError(f"{self.file('pte')}: a program of another model (inputs {n_in}, params shape "
                              f"{shape}); the manifest wants {expected} inputs and params ({self.num_params},)")

    def _run(self, params, feed, outputs=("loss",)):
        rows = len(feed[self.input_names[0]])
        if rows != self.fixed_batch:
            if outputs == ("loss",):
                raise EdgezoError(f"the ExecuTorch program takes batches of {self.fixed_batch} rows, got {rows}")
            return super()._run(params, feed, outputs)
        args = [torch.from_numpy(np.ascontiguousarray(params, np.float32))]
        args += [torch.from_numpy(feed[n]) for n in self.input_names + self.target_names]
        loss, out = self.method.execute(args)
        return [loss.numpy().reshape(()), out.numpy()][:len(outputs)]
