"""Device-side runtime: load a bundle, classify images, draw heatmaps.

numpy + Pillow + LiteRT (``ai_edge_litert``, or ``tflite_runtime``) only:
importing this package never imports TensorFlow (a test checks ``sys.modules``
in a fresh interpreter)::

    from leukoedge.runtime import load_bundle, Classifier
    clf = Classifier(load_bundle("bundle/"), edgetpu="auto")   # once per process
    pred = clf.classify("cell.jpg")
    pred.label, pred.confidence, pred.abstained, pred.heatmap, clf.info()
"""
from ..bundle import Bundle, load_bundle
from .backend import EDGETPU_MODES, find_litert, select_delegate
from .classifier import Classifier, Prediction, RawOutput
from .heatmap import overlay

__all__ = [
    "Bundle",
    "Classifier",
    "EDGETPU_MODES",
    "Prediction",
    "RawOutput",
    "find_litert",
    "load_bundle",
    "overlay",
    "select_delegate",
]
