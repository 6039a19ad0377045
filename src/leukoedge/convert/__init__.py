"""Workstation side: Keras -> TFLite, quantisation, the parity gate, bundles, Edge TPU checks.

Import the submodules you need (``convert.pipeline.convert_run``); this
package's ``__init__`` imports nothing heavy so ``leukoedge --help`` stays fast.
"""
