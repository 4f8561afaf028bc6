"""The cross-framework parity suite: each behaviour of the Keras reference next to the port's,
with a named tolerance; ``python -m parity_tests`` prints the report.

TensorFlow and PyTorch share this process; Triton (from torch's wheel) must load first.
"""

from tl_common.compat import load_before_tensorflow

load_before_tensorflow()
