"""JSON for the numpy scalars and arrays that reports and metrics carry (the job's ``report.json``, a search's
per-candidate rows)."""
from __future__ import annotations

from typing import Any

import numpy as np


def json_default(o: Any) -> Any:
    """``json.dumps`` default: numpy integers and floats as Python numbers, arrays as lists, anything else
    as its ``str``.

    Example:
        >>> import json
        >>> json.dumps({"acc": np.float32(0.5), "n": np.int64(3)}, default=json_default)
        '{"acc": 0.5, "n": 3}'
    """
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
