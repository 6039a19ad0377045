"""Dataset readers, checks, leakage-aware split manifests and the synthetic smear generator.

TensorFlow-free: importing this package never imports TensorFlow.
"""
from .check import CheckReport, check_dataset
from .readers import Layout, detect_layout, list_layouts, read_dataset, register_layout
from .records import SPLIT_KINDS, SPLITS, Manifest, ManifestEntry, Record, class_names
from .split import make_manifest
from .synth import generate as generate_synthetic
from .synth import render_field

__all__ = [
    "CheckReport",
    "Layout",
    "Manifest",
    "ManifestEntry",
    "Record",
    "SPLITS",
    "SPLIT_KINDS",
    "check_dataset",
    "class_names",
    "detect_layout",
    "generate_synthetic",
    "list_layouts",
    "make_manifest",
    "read_dataset",
    "register_layout",
    "render_field",
]
