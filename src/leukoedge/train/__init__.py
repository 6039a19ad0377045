"""Training, evaluation, reports and model cards (needs the ``train`` extra: TensorFlow).

Importing this package does not import TensorFlow; the modules that need it
import it themselves.
"""
