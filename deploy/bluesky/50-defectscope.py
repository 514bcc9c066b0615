"""IPython profile startup for a bluesky session: every run of ``RE`` classified by a defectscope server.

Copy into the session's profile, after the file that makes the RunEngine, e.g.
``~/.ipython/profile_collection/startup/50-defectscope.py`` (``RE`` must exist by then). Settings, from the
environment of the session:

    DEFECTSCOPE_SERVER          tcp://inference-host:5557 (default tcp://127.0.0.1:5557)
    DEFECTSCOPE_GEOMETRY        a JSON file with the scan geometry (SPEC section 4 ``input.geometry``: preset,
                                angles, direct_beam, rocking motor; start and step come from the motor)
    DEFECTSCOPE_DETECTOR_FIELD  the event field holding the detector frame (default det_image)
    DEFECTSCOPE_MODEL           a served model name (default: the server's first)

The answers are in ``defectscope_cb.results[run_uid]`` (``defectscope_cb.errors`` for the runs that could not
be classified) and in the session's log.
"""

import json
import os

from defectscope.server.bluesky import ClassifyCallback
from defectscope.server.client import Client

defectscope_client = Client(os.environ.get("DEFECTSCOPE_SERVER", "tcp://127.0.0.1:5557"), timeout_s=30)
with open(os.environ["DEFECTSCOPE_GEOMETRY"]) as _f:
    _geometry = json.load(_f)
defectscope_cb = ClassifyCallback(defectscope_client, _geometry,
                                  detector_field=os.environ.get("DEFECTSCOPE_DETECTOR_FIELD", "det_image"),
                                  model=os.environ.get("DEFECTSCOPE_MODEL") or None)
RE.subscribe(defectscope_cb)  # noqa: F821 (RE: made by the profile's earlier startup files)
