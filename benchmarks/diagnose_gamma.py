"""Why does CoCD at the paper's MNIST settings (gamma 0.99) collapse? Train paper-cnn with CoCD and every
--every steps measure: test accuracy (1,000 images), the fraction of dead ReLU channels per conv layer (zero
for all of 512 training images), each layer's weight norm, the buffer's norm and the largest update.
Stops --after a collapse (train loss within 1e-3 of ln 10 for 3 checks) or after --epochs.

Usage: python benchmarks/diagnose_gamma.py [--gamma 0.99] [--epochs 15] [--every 100]
Writes benchmarks/results/diagnose_gamma<g>.json.
"""
import argparse
import math

import numpy as np
import onnx
from onnx import helper

from common import SHARED, builtin_artifact, write_json
from edgezo.runtime import load_artifact
from edgezo.runtime.optim import CoCD
from edgezo.runtime.sessions import make_session
from edgezo.runtime.train import evaluate, fit
from edgezo.runtime.writeback import write_back
from paper import WD
from paper_data import mnist_data


def relu_session(artifact, params, path):
    """The inference model at params, with every Relu output as an extra graph output."""
    write_back(artifact.file("inference"), artifact.manifest["trainable"], params, path)
    model = onnx.load(str(path))
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    model.graph.output.extend(helper.make_tensor_value_info(r, onnx.TensorProto.FLOAT, None) for r in relus)
    return make_session(model, "cpu"), relus


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", help="only draw the PNG of this JSON")
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot)
    train, test = mnist_data(SHARED / "datasets" / "mnist")
    test = {k: v[:1000] for k, v in test.items()}
    probe_x = train["x"][:512]
    art = load_artifact(builtin_artifact("paper-cnn"), device="cpu", threads=args.threads)
    params = art.initial_params()
    opt = CoCD(params, lr=args.lr, eps=0.1, budget=256, gamma=args.gamma, weight_decay=WD)
    records, recent, last = [], [], params.copy()
    name = f"diagnose_gamma{args.gamma:g}" + ("" if args.lr == 1e-2 else f"_lr{args.lr:g}")

    class Collapsed(Exception):
        pass

    def on_step(epoch, b, result):
        recent.append(result.loss)
        if opt.steps % args.every:
            return
        session, relus = relu_session(art, params, "/tmp/diagnose.onnx")
        outs = session.run(None, {art.input_names[0]: probe_x})
        dead = {r: float(np.mean(np.all(o.reshape(len(o), o.shape[1], -1) <= 0, axis=(0, 2))))
                for r, o in zip(relus, outs[1:])}
        norms = {e["name"]: float(np.linalg.norm(params[e["offset"]:e["offset"] + e["size"]]))
                 for e in art.manifest["trainable"] if e["name"].endswith("weight")}
        rec = {"step": opt.steps, "epoch": epoch + 1, "train_loss": float(np.mean(recent)),
               "test_accuracy": evaluate(art, params, test)["accuracy"], "dead_relu_channels": dead,
               "weight_norms": norms, "buffer_norm": float(np.linalg.norm(opt.buffer)),
               "max_update": float(np.max(np.abs(params - last))), "logit_std": float(outs[0].std())}
        records.append(rec)
        recent.clear()
        last[:] = params
        print(f"step {opt.steps}: loss {rec['train_loss']:.4f} acc {100 * rec['test_accuracy']:.1f}% dead "
              f"{[round(v, 2) for v in dead.values()]} |buffer| {rec['buffer_norm']:.3g} max update "
              f"{rec['max_update']:.3g} logit std {rec['logit_std']:.3g}", flush=True)
        write_json(name, {"gamma": args.gamma, "lr": args.lr, "records": records}, quiet=True)
        if len(records) >= 3 and all(abs(r["train_loss"] - math.log(10)) < 1e-3 for r in records[-3:]):
            raise Collapsed
    try:
        fit(art, opt, train, 128, args.epochs, seed=0, log=None, on_step=on_step)
    except Collapsed:
        print(f"collapsed by step {opt.steps}")
    plot(write_json(name, {"gamma": args.gamma, "lr": args.lr, "records": records}))


def plot(path):
    """PNG beside the JSON: test accuracy, dead ReLU channels per layer and the buffer's norm over steps."""
    import json
    from pathlib import Path
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.loads(Path(path).read_text())
    recs = data["records"]
    steps = [r["step"] for r in recs]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    a.plot(steps, [100 * r["test_accuracy"] for r in recs], label="test accuracy (%)")
    a.plot(steps, [10 * r["buffer_norm"] for r in recs], label="10 x buffer norm", alpha=0.6)
    a.legend(fontsize=7)
    a.set_title(f"paper-cnn, MNIST, CoCD gamma {data['gamma']} (lr {data['lr']}, eps 0.1, B 256)")
    for k, layer in enumerate(recs[0]["dead_relu_channels"]):
        b.plot(steps, [100 * r["dead_relu_channels"][layer] for r in recs], label=f"conv{k + 1} ReLU")
    b.set_ylabel("dead channels (%)")
    b.set_xlabel("step (469 per epoch)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(path).with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
