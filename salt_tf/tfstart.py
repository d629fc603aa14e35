"""Starting TensorFlow from a command: no CUDA noise on a CPU machine, real errors kept, the devices named.

The `tensorflow` wheel (2.21) carries its CUDA support inside the library. On a machine without an NVIDIA
driver it says so at every start, as measured here:

    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.   (import)
    E0000 ... cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: ... (303)     (device listing)

Neither setting TensorFlow offers removes them without hiding real problems: the import-time lines are
written through absl before its logging is initialized and ignore TF_CPP_MIN_LOG_LEVEL (even 3), and the
cuInit line is an ERROR that only TF_CPP_MIN_LOG_LEVEL=3 hides, together with every other error;
CUDA_VISIBLE_DEVICES="" or "-1" still calls cuInit. Installing `tensorflow-cpu` instead would remove them
but changes the package every machine installs (and both wheels own the `tensorflow/` folder).

So `import_tensorflow()` imports TensorFlow and lists its devices (which runs cuInit) with the process's
stderr (file descriptor 2) sent to a temporary file, then writes that output back, leaving out only:
  * the two "no CUDA here" notices, and only when the machine has no NVIDIA driver (no
    /proc/driver/nvidia/version and no loadable libcuda.so.1): with a driver, a failing cuInit is a real
    error and stays;
  * log lines below TF_CPP_MIN_LOG_LEVEL (set to 1 if unset: INFO hidden, warnings and errors shown), which
    TensorFlow's own pre-initialization lines do not honour, and absl's banner above them when nothing of
    theirs is left.
Everything else (warnings, errors, Python tracebacks) is written back as it came. TF_CPP_MIN_LOG_LEVEL=0
keeps every line. Commands call it before anything imports TensorFlow; `device_summary()` is the one line
they print about the devices used.

No TensorFlow import at module level: `--help` stays cheap.

The package's import makes TensorFlow's BFC pool its CPU allocator (salt_tf/__init__.py: the measured reason).
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import tempfile

LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LOG_LEVEL = "1"  # INFO hidden; warnings and errors shown
NO_CUDA_NOTICES = ("Could not find cuda drivers on your machine", "failed call to cuInit")
ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# An absl / TensorFlow C++ log line: severity letter, MMDD, time, thread, file:line].
_LOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+\s+\S+:\d+\]")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver TensorFlow could use (kernel module or libcuda)."""
    if os.path.exists("/proc/driver/nvidia/version"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")  # also true under WSL2, which has no /proc/driver/nvidia
        return True
    except OSError:
        return False


def filter_startup_output(text: str, min_level: int, driver_present: bool) -> str:
    """The start-up output `text` without what `import_tensorflow` leaves out (see the module docstring).

    Args:
        text: what was written to stderr while TensorFlow was imported and listed its devices.
        min_level: TF_CPP_MIN_LOG_LEVEL (0 keeps every log line; 1 drops INFO; 2 also WARNING; 3 also ERROR).
        driver_present: whether the machine has an NVIDIA driver (then the CUDA lines are kept).

    Returns:
        The lines to show, in their order, each with its newline.
    """
    kept: list[str] = []
    banner_at = None
    log_lines_kept = 0
    keep_current = True  # a line that is not a log line continues the previous one (multi-line messages)
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == ABSL_BANNER:
            banner_at = len(kept)
            kept.append(line)
            keep_current = True
            continue
        match = _LOG_LINE.match(line)
        if match:
            keep_current = _SEVERITY[match.group(1)] >= min_level and not (
                not driver_present and any(notice in line for notice in NO_CUDA_NOTICES))
            log_lines_kept += keep_current
        if keep_current:
            kept.append(line)
    if banner_at is not None and log_lines_kept == 0:
        kept = [line for line in kept if line.rstrip("\n") != ABSL_BANNER]
    return "".join(kept)


def import_tensorflow():
    """Imports TensorFlow and initializes its device list, with the start-up output sorted as described in
    the module docstring. Idempotent; when TensorFlow is already imported it is returned as it is.

    Returns:
        The `tensorflow` module.
    """
    os.environ.setdefault(LOG_LEVEL_VARIABLE, DEFAULT_LOG_LEVEL)
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    try:
        min_level = int(os.environ[LOG_LEVEL_VARIABLE])
    except ValueError:
        min_level = int(DEFAULT_LOG_LEVEL)
    driver_present = nvidia_driver_present()
    if min_level <= 0:  # the user asked for every line
        import tensorflow as tf

        tf.config.list_physical_devices()
        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # initializes the platforms: where cuInit is called
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            shown = filter_startup_output(text, min_level, driver_present)
            if shown:
                sys.stderr.write(shown)
                sys.stderr.flush()
    return tf


def device_summary(tf=None) -> str:
    """One line naming the devices TensorFlow will use, e.g. "devices: GPU:0 (NVIDIA A100-SXM4-40GB), CPU:0"
    or "devices: CPU:0 (no GPU: no NVIDIA driver on this machine)".

    Args:
        tf: the tensorflow module (default: import it through `import_tensorflow`).

    Returns:
        The line, without a newline.
    """
    tf = tf or import_tensorflow()
    names = []
    gpus = tf.config.list_physical_devices("GPU")
    for index, gpu in enumerate(gpus):
        try:
            detail = tf.config.experimental.get_device_details(gpu).get("device_name")
        except (ValueError, RuntimeError):
            detail = None
        names.append(f"GPU:{index}" + (f" ({detail})" if detail else ""))
    names += [f"CPU:{i}" for i, _ in enumerate(tf.config.list_physical_devices("CPU"))]
    why = ""
    if not gpus:
        why = " (no GPU: no NVIDIA driver on this machine)" if not nvidia_driver_present() else \
            " (no GPU visible to TensorFlow: check CUDA_VISIBLE_DEVICES and the messages above)"
    return "devices: " + ", ".join(names) + why
