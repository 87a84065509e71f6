"""The export settings: what to train (shared by `edgezo export` and `export-onnx`) and how an ONNX model becomes
an artifact. The CLI builds its flags from these fields (runtime.config.add_flags), and export_onnx takes the same
names as keywords or as `config=`."""
from dataclasses import asdict, dataclass

from ..runtime.config import _flag


@dataclass
class Selection:
    """What trains: the union of the selections given."""
    trainable: list = _flag("glob patterns of tensors to train (matched against Identity aliases' names too)",
                            nargs="+", metavar="PATTERN")
    last_layers: int = _flag("train the last K Gemm/MatMul/Conv layers", metavar="K")
    norms: bool = _flag("train BatchNorm/LayerNorm scale and shift", default=False, flag=True)
    biases: bool = _flag("train every bias (BitFit)", default=False, flag=True)
    scales: bool = _flag("quantized (QDQ int8) models: train every quantized weight's scales, per channel or per "
                         "tensor, as log-factors (scale0 * exp(t)); tied int32 biases are re-quantized with them",
                         default=False, flag=True)
    activation_scales: bool = _flag("quantized (QDQ int8) models: train every quantized activation's scale (what "
                                    "calibration chose) as a log-factor; the biases read at it are re-quantized with "
                                    "it", default=False, flag=True)
    lora: int = _flag("train low-rank adapters (A [r, in], B [out, r], B = 0 at start) beside the frozen "
                      "Gemm/MatMul/Conv weights; write-back merges them into the weights", metavar="RANK")
    lora_targets: str = _flag("--lora: only the layers whose weight or node name matches", metavar="GLOB")

    def given(self):
        return bool(self.trainable or self.last_layers or self.norms or self.biases or self.scales or
                    self.activation_scales)

    def tensors(self):
        """The keyword arguments of onnx_import.choose."""
        return dict(trainable=self.trainable, last_layers=self.last_layers, norms=self.norms, biases=self.biases,
                    scales=self.scales, activation_scales=self.activation_scales)


@dataclass
class ExportConfig(Selection):
    """export-onnx: a selection, plus the loss, a fresh head and the inputs that are not data."""
    num_classes: int = _flag("replace the final classifier layer with a fresh, seeded one for K classes", metavar="K")
    seed: int = _flag("--lora and --num-classes initialization seed", default=0)
    loss: str = _flag("default: cross_entropy on the logits for a Softmax/LogSoftmax output, binary_cross_entropy "
                      "on the logits for a Sigmoid output; required otherwise",
                      choices=("mse", "cross_entropy", "binary_cross_entropy"))
    output: str = _flag("which model output the loss uses (default: the first)")
    fix_input: list = _flag("fix a non-data input (a recurrent state, a sample rate) to a number or a .npy file; "
                            "broadcast along the batch axis where the input has one", factory=list, nargs="+",
                            metavar="NAME=VALUE")
    sample_data: str = _flag("a .npz/.npy of the model's inputs (batch-first): the export's smoke test runs on its "
                             "shapes (default: guessed sizes, said when 8 does not run)", metavar="FILE")
    batch_axis: list = _flag("the batch axis of an input or output (default: found from the data input's first "
                             "symbolic dimension); data files are always batch-first", factory=list, nargs="+",
                             metavar="NAME=AXIS")

    def arguments(self):
        """export_onnx's keyword arguments."""
        kw = asdict(self)
        kw["lora_targets_glob"] = kw.pop("lora_targets")
        return kw
