"""No network at run time: OpenVINO's and NNCF's usage telemetry switched off before they load.

Facts (openvino 2026.4.1, nncf 3.4.0, openvino-telemetry 2025.2.0, read from their sources):

* The OpenVINO runtime itself sends nothing: none of its native libraries (``libopenvino*.so``,
  the CPU/GPU plugins, the frontends, TBB) imports ``socket``, ``connect``, ``getaddrinfo`` or
  ``gethostbyname`` (``nm -D --undefined-only``); the frontends' ``TelemetryExtension`` only
  forwards events to a callback that the Python model converter registers.
* The Python tools do send: ``nncf`` creates an ``openvino_telemetry.Telemetry`` when it is
  imported and ``nncf.quantize`` posts events to Google Analytics from a thread pool; the model
  converter (``openvino.convert_model`` / ``ovc``) does the same. Both use
  ``enable_opt_in_dialog=False``, i.e. **opt-out**: without a consent file
  (``~/intel/openvino_telemetry`` containing ``0``) they send, and importing nncf writes a client
  id file under ``~/intel``.
* Both import ``openvino_telemetry`` inside ``try/except ImportError`` and then use a no-op stub
  (nncf: ``NNCFTelemetryStub``, ovc: ``openvino.tools.ovc.telemetry_stub``).

Decision: :func:`disable_openvino_telemetry` makes ``import openvino_telemetry`` fail *in this
process* (``sys.modules["openvino_telemetry"] = None``, Python's documented way to block an
import), so both tools take their own no-op path: nothing is sent, no thread is started, nothing
is written under ``~/intel``. It also sets ``NNCF_CI=1`` (nncf's own switch that replaces its
telemetry by the stub) in case the real package was imported before us. It changes no file of
the user's and no global consent. Every ciae_core module that imports openvino or nncf calls it
first (:func:`import_openvino`, :func:`import_nncf`); a process that imported
``openvino_telemetry`` (e.g. through nncf) before ciae_core gets a warning naming the opt-out.
test/ciae_core/test_no_telemetry.py proves it at socket level.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

TELEMETRY_MODULE = "openvino_telemetry"


def disable_openvino_telemetry() -> bool:
    """Block the ``openvino_telemetry`` package in this process (module docstring).

    Returns True when it is blocked now, False (with a warning) when the real package had
    already been imported by someone else, in which case only nncf's ``NNCF_CI`` switch applies
    to modules imported from now on.
    """
    os.environ.setdefault("NNCF_CI", "1")
    loaded = sys.modules.get(TELEMETRY_MODULE, None)
    if loaded is None:
        sys.modules[TELEMETRY_MODULE] = None  # type: ignore[assignment]  # import now raises ImportError
        return True
    logger.warning("%s was imported before ciae_core could block it; OpenVINO tools in this process may send "
                   "usage telemetry. Opt out for good with `opt_in_out --opt_out` (openvino-telemetry) or import "
                   "ciae_core first", TELEMETRY_MODULE)
    return False


def import_openvino():
    """``import openvino`` with telemetry blocked first; the module."""
    disable_openvino_telemetry()
    import openvino

    return openvino


def import_nncf():
    """``import nncf`` with telemetry blocked first; the module."""
    disable_openvino_telemetry()
    import nncf

    return nncf
