"""No line on stderr that the user did not ask for (issue 14): native start-up chatter is dropped, ``-v`` keeps it.

The seven lines below are what every TensorFlow command printed before, verbatim
from a CPU-only machine; an unknown native error must still get through.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from leukoedge.quiet import is_noise

CHATTER = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796116339.019890     316 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders.",
    "I0000 00:00:1796116339.020220     316 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "E0000 00:00:1796116341.895596     316 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
    "W0000 00:00:1796116350.101010     316 tf_tfl_flatbuffer_helpers.cc:365] Ignored output_format.",
    "fully_quantize: 0, inference_type: 6, input_inference_type: INT8, output_inference_type: INT8",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
]
KEPT = [
    "E0000 00:00:1796116341.895596     316 op_kernel.cc:1830] OP_REQUIRES failed at conv_ops.cc:1: out of memory",
    "error: calibration needs at least 32 images from the train split, which has only 20",
    "Traceback (most recent call last):",
    "Segmentation fault (core dumped)",
]


@pytest.mark.parametrize("line", CHATTER)
def test_known_chatter_is_noise(line):
    assert is_noise(line)


@pytest.mark.parametrize("line", KEPT)
def test_real_errors_are_not_noise(line):
    assert not is_noise(line)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TQDM_DISABLE")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_native_writes_are_filtered_but_python_stderr_and_real_errors_pass():
    proc = _run(f"""
        import os, sys
        from leukoedge.quiet import filter_native_stderr
        with filter_native_stderr():
            for line in {CHATTER!r} + {KEPT[:1]!r}:
                os.write(2, (line + "\\n").encode())  # as C++ code writes: straight to descriptor 2
            print("python says hello", file=sys.stderr)
            os.write(2, b"no newline at the end")
        print("after", file=sys.stderr)
    """)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "python says hello" in err and "after" in err and "no newline at the end" in err
    assert KEPT[0] in err
    for line in CHATTER:
        assert line not in err


@pytest.mark.slow
def test_a_tensorflow_command_prints_no_chatter_unless_verbose():
    main = "import sys; from leukoedge.cli import main; sys.exit(main(sys.argv[1:]))"
    quiet = _run(main, "train", "--list-models")
    assert quiet.returncode == 0 and "leuko-small" in quiet.stdout
    assert quiet.stderr.strip() == "", quiet.stderr
    loud = _run(main, "-v", "train", "--list-models")
    assert loud.returncode == 0 and ("port.cc" in loud.stderr or "absl" in loud.stderr)


def test_progress_bars_only_on_a_terminal():
    """Piped to a log file, a bar left carriage returns and blank lines behind."""
    proc = _run("""
        from leukoedge.quiet import quiet_environment
        quiet_environment()
        from tqdm import tqdm
        for _ in tqdm(range(50), desc="load train", leave=False):
            pass
    """)
    assert proc.returncode == 0 and proc.stderr == ""
