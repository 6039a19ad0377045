#!/usr/bin/env python3
"""Quantisation-aware fine-tuning on this stack: which route works (issue 17, item 3). Evidence, not a feature.

    pip install --target /tmp/qat-pkgs --no-deps tf_keras==2.21.0 tensorflow-model-optimization==0.8.1 dm-tree
    PYTHONPATH=/tmp/qat-pkgs python benchmarks/qat_probe.py --run /work/runs/taleqani-seed-lenet [--epochs 2]

(Kept out of the project's dependencies on purpose: see the results file.)
Three routes, each tried for real on a trained run and its split:

1. ``tensorflow-model-optimization`` 0.8 on the run's own Keras 3 model
   (``quantize_model``): expected to be refused (tfmot is written against
   tf.keras 2).
2. The same architecture rebuilt in ``tf_keras`` 2.21 (the registry's builder
   run with ``keras`` bound to tf_keras), the Keras 3 weights copied layer by
   layer, ``tfmot.quantization.keras.quantize_model``, fine-tuned for
   ``--epochs`` on the train split at a low learning rate, converted with
   ``TFLiteConverter.from_keras_model`` (int8 I/O), and graded against the
   run's FLOAT Keras 3 model on val and test through LiteRT: flips, like the
   parity gate. Post-training full int8 of the same run is graded the same way.
3. Keras 3's own ``Model.quantize("int8")``: weight-only int8 for Keras
   inference; whether the TFLite converter takes the quantised model.

Writes benchmarks/results/qat_probe.{md,json}.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from _common import RESULTS, main_guard, write_results

from leukoedge.quiet import quiet_environment

quiet_environment()


def last_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"[:400]


def data(run: Path):
    from leukoedge.convert import calibration
    from leukoedge.train.rundir import RunDir

    rd = RunDir(run)
    manifest, spec = rd.manifest(), rd.config().preprocess_spec
    out = {}
    for split in ("train", "val", "test"):
        entries = manifest.subset(split)
        images = calibration.load_images(manifest, entries, spec, None, split)
        out[split] = (images, np.array([manifest.label_index(e.label) for e in entries]))
    return rd, out


def flips_against(float_top: np.ndarray, tflite: bytes, images: np.ndarray, labels: np.ndarray) -> dict:
    from leukoedge.runtime.backend import find_litert

    interp = find_litert().interpreter_cls(model_content=tflite, num_threads=2)
    interp.allocate_tensors()
    runner = interp.get_signature_runner()
    name_in = next(iter(runner.get_input_details()))
    detail = runner.get_input_details()[name_in]
    outs = runner.get_output_details()
    prob_name = "probabilities" if "probabilities" in outs else next(iter(outs))
    scale, zero = detail["quantization"]
    top = []
    for img in images:
        x = img[None].astype(np.float32)
        if detail["dtype"] != np.float32:
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(detail["dtype"])
        top.append(int(np.argmax(runner(**{name_in: x})[prob_name])))
    top = np.array(top)
    return {"n": len(images), "flips": int((top != float_top).sum()), "accuracy": float((top == labels).mean()),
            "size_bytes": len(tflite)}


def route_tfmot_on_keras3(model) -> dict:
    try:
        import tensorflow_model_optimization as tfmot

        tfmot.quantization.keras.quantize_model(model)
    except Exception as err:  # noqa: BLE001 - the evidence is the error itself, whatever it is
        return {"works": False, "error": last_line(err)}
    return {"works": True, "error": None}


def build_in_tf_keras(model_name: str, input_size: int, classes: int):
    """The registry's builder with ``keras`` bound to tf_keras (module swap for the build only)."""
    import tf_keras

    saved = {k: sys.modules.get(k) for k in ("keras", "keras.layers", "keras.regularizers")}
    sys.modules.update({"keras": tf_keras, "keras.layers": tf_keras.layers, "keras.regularizers": tf_keras.regularizers})
    try:
        for mod in ("leukoedge.models.blocks", "leukoedge.models.paper", "leukoedge.models.edge"):
            sys.modules.pop(mod, None)
        blocks = importlib.import_module("leukoedge.models.blocks")
        paper = importlib.import_module("leukoedge.models.paper")
        edge = importlib.import_module("leukoedge.models.edge")
        fn = {"seed-lenet": getattr(paper, "seed_lenet", None), "seed-cnn13": paper.seed_cnn13,
              "seed-vgg16": getattr(paper, "seed_vgg16", None), "leuko-small": edge.leuko_small,
              "leuko-tiny": edge.leuko_tiny, "seed-cnn6": paper.seed_cnn6,
              "seed-sequential": paper.seed_sequential}.get(model_name)
        if fn is None:
            raise SystemExit(f"the probe knows no tf_keras build for {model_name}")
        del blocks
        return fn(input_size, classes)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for mod in ("leukoedge.models.blocks", "leukoedge.models.paper", "leukoedge.models.edge"):
            sys.modules.pop(mod, None)
        importlib.import_module("leukoedge.models")


def route_tf_keras_qat(k3_model, model_name: str, size: int, classes: int, splits: dict, float_top: dict,
                       epochs: int, lr: float) -> dict:
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    result: dict = {"steps": []}
    try:
        tk = build_in_tf_keras(model_name, size, classes)
        copied = 0
        for layer in tk.layers:
            weights = k3_model.get_layer(layer.name).get_weights() if layer.weights else []
            if weights:
                layer.set_weights(weights)
                copied += 1
        result["steps"].append(f"rebuilt in tf_keras, weights of {copied} layers copied")
        probe = splits["val"][0][:32].astype(np.float32)
        gap = float(np.abs(tk.predict(probe, verbose=0) - np.asarray(k3_model(probe))).max())
        result["steps"].append(f"tf_keras float vs Keras 3 float: max |p| difference {gap:.2e} on 32 val images")

        def annotate(layer):
            # Rescaling has no QuantizeConfig in tfmot 0.8: leave it (and dropout) unannotated.
            import tf_keras

            if isinstance(layer, (tf_keras.layers.Rescaling, tf_keras.layers.Dropout)):
                return layer
            return tfmot.quantization.keras.quantize_annotate_layer(layer)

        import tf_keras

        annotated = tf_keras.models.clone_model(tk, clone_function=annotate)
        annotated.set_weights(tk.get_weights())
        qat = tfmot.quantization.keras.quantize_apply(annotated)
        result["steps"].append(f"quantize_apply: {len(qat.layers)} layers")
        qat.compile(optimizer=tf_keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        x, y = splits["train"]
        start = time.perf_counter()
        hist = qat.fit(x.astype(np.float32), y, batch_size=32, epochs=epochs, verbose=0, shuffle=True,
                       validation_data=(splits["val"][0].astype(np.float32), splits["val"][1]))
        result["train_seconds"] = time.perf_counter() - start
        result["steps"].append(f"fine-tuned {epochs} epoch(s) at lr {lr}: val accuracy "
                               f"{[round(v, 4) for v in hist.history['val_accuracy']]}")
        converter = tf.lite.TFLiteConverter.from_keras_model(qat)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

        def rep():
            for img in x[:100]:
                yield [img[None].astype(np.float32)]

        converter.representative_dataset = rep
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        tflite = bytes(converter.convert())
        result["steps"].append("converted to int8 TFLite (int8 I/O)")
        result.update({split: flips_against(float_top[split], tflite, *splits[split]) for split in ("val", "test")})
        # The fine-tuned model is a new model: its own float (fake-quant) graph against its int8 TFLite.
        own = {s: qat.predict(splits[s][0].astype(np.float32), verbose=0).argmax(1) for s in ("val", "test")}
        result["against_own_fake_quant"] = {s: flips_against(own[s], tflite, *splits[s]) for s in ("val", "test")}
        result["fake_quant_test_accuracy"] = float((own["test"] == splits["test"][1]).mean())
        result["works"] = True
    except Exception as err:  # noqa: BLE001 - a route that breaks anywhere is recorded, not raised
        result.update(works=False, error=last_line(err), trace=traceback.format_exc()[-1500:])
    return result


def route_keras3_quantize(model_path: Path) -> dict:
    import keras
    import tensorflow as tf

    try:
        model = keras.models.load_model(model_path, compile=False)
        model.quantize("int8")
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        tflite = bytes(converter.convert())
    except Exception as err:  # noqa: BLE001 - recorded as the route's evidence
        return {"works": False, "error": last_line(err)}
    return {"works": True, "error": None, "size_bytes": len(tflite),
            "note": "weight-only int8 for Keras inference; activations stay float, so not a full-int8 model"}


def ptq(k3_model, splits, float_top) -> dict:
    from leukoedge.convert import calibration, export
    from leukoedge.convert.modes import MODES

    x = splits["train"][0]
    rng = np.random.default_rng(0)
    rep = x[rng.choice(len(x), size=min(300, len(x)), replace=False)]
    tflite = export.convert(export.build_export_model(k3_model, False), MODES["int8"],
                            calibration.representative_dataset(rep))
    return {split: flips_against(float_top[split], tflite, *splits[split]) for split in ("val", "test")}


def markdown(d: dict) -> str:
    lines = [f"Run: `{d['run']}` ({d['model']}, {d['input']} px); float Keras 3 model as the reference; flips = "
             "images whose top-1 differs from float, through LiteRT, like the parity gate.", "",
             "| route | works here | val flips | test flips | test accuracy | size (B) | note |", "|---|---|---|---|---|---|---|"]

    def cell(r, split, key):
        return "" if split not in r else f"{r[split][key]}" if key != "accuracy" else f"{r[split][key]:.4f}"

    for name, r in d["routes"].items():
        size = r.get("size_bytes") or (r.get("test") or {}).get("size_bytes", "")
        lines.append(f"| {name} | {'yes' if r.get('works') else 'NO'} | {cell(r, 'val', 'flips')} "
                     f"| {cell(r, 'test', 'flips')} | {cell(r, 'test', 'accuracy')} | {size} "
                     f"| {r.get('error') or r.get('note') or '; '.join(r.get('steps', []))} |")
    for name, r in d["routes"].items():
        own = r.get("against_own_fake_quant")
        if own:
            lines += ["", f"{name}: its int8 TFLite against its own Keras (fake-quant) graph: {own['val']['flips']} val "
                      f"and {own['test']['flips']} test flips; fake-quant test accuracy "
                      f"{r['fake_quant_test_accuracy']:.4f}; fine-tuning took {r['train_seconds']:.0f} s."]
    lines += ["", f"Float test accuracy: {d['float_test_accuracy']:.4f} (n = {d['n_test']}).", "",
              "Research use only; not a diagnostic device."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--name", default="qat_probe")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    import keras

    rd, splits = data(args.run)
    config = rd.config()
    model = keras.models.load_model(rd.model_path, compile=False)
    float_top = {s: np.asarray(model.predict(splits[s][0].astype(np.float32), verbose=0)).argmax(1)
                 for s in ("val", "test")}
    routes = {"tfmot 0.8 on the Keras 3 model": route_tfmot_on_keras3(model),
              "post-training full int8 (today's convert)": {"works": True, **ptq(model, splits, float_top)},
              f"tf_keras 2.21 + tfmot QAT ({args.epochs} epochs)": route_tf_keras_qat(
                  model, config.model, config.input_size, len(config.classes), splits, float_top, args.epochs, args.lr),
              "Keras 3 Model.quantize('int8') -> TFLite": route_keras3_quantize(rd.model_path)}
    d = {"run": str(args.run), "model": config.model, "input": config.input_size, "routes": routes,
         "n_test": len(splits["test"][1]),
         "float_test_accuracy": float((float_top["test"] == splits["test"][1]).mean())}
    write_results(args.name, d, markdown(d), "QAT probe: quantisation-aware fine-tuning on TF 2.21 / Keras 3.15",
                  out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    main_guard(main)
