"""leukoedge: leukemia cell classification on a microscope-attached Raspberry Pi.

Research use only; not a diagnostic device. Importing this package must never
import TensorFlow: the device install (``leukoedge[edge]``) does not have it.
"""
__version__ = "0.1.0"

RESEARCH_NOTICE = (
    "Research use only. leukoedge is not a diagnostic device and its output is "
    "not a diagnosis."
)
