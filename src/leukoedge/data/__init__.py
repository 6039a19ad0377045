"""Dataset readers, checks, leakage-aware split manifests and the synthetic smear generator.

TensorFlow-free: importing this package never imports TensorFlow.
"""
from .records import SPLIT_KINDS, SPLITS, Manifest, ManifestEntry, Record, class_names

__all__ = ["Manifest", "ManifestEntry", "Record", "SPLITS", "SPLIT_KINDS", "class_names"]
