"""qarm: multi-modal recommendation with trainable semantic-ID codes (QARM, EM3, FGCNN).

Stages, one sub-package each, in the order the data flows:
``data`` -> ``encode`` -> ``align`` -> ``quantize`` -> ``features`` -> ``models`` -> ``train``
-> ``evaluate`` -> ``serve``. The CLI (:mod:`qarm.cli`) and the pipeline (:mod:`qarm.pipeline`) sit on top.
"""

__version__ = "0.2.0"
