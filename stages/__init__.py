"""The DVC stages' command-line programs, run as ``python -m stages.<stage>`` (see dvc.yaml).

Importing the package asks Linux to SIGTERM the process when its parent exits (PR_SET_PDEATHSIG),
so killing `dvc repro` (the parent: DVC's ``/bin/sh -c`` execs the single command) leaves no
orphan writing outputs that ``dvc.lock`` will not record. It happens here, before a stage module's
own imports, because those take seconds (torch) and a parent killed meanwhile would go unnoticed
(measured: under load the test that kills dvc 2 s after the stage started found it still running).
Elsewhere than Linux it is a no-op.
"""

import sys

if sys.platform.startswith("linux"):
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
