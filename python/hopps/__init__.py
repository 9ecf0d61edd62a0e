"""hopps: the Python client of hopps, a parameter server for recommendation models.

Look rows up from a running node into numpy (and from there into PyTorch), write rows online,
roll a model back, and publish versions to a model repository from numpy, pandas or pyarrow::

    import numpy as np
    import hopps

    hopps.publish("./hopps-data", "ctr", "user", keys, values)      # keys (n,), values (n, dim)
    client = hopps.Client("127.0.0.1:7070")
    values, found = client.lookup("ctr", "user", np.array([1, 2, 3], dtype=np.uint64))
    client.rollback("ctr", to=1)

Every call goes through the Rust client (``hopps-client``) in the native module
``hopps._hopps``; calls release the GIL while they wait for the node.
"""

from __future__ import annotations

from ._errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    HoppsError,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from ._hopps import Client, Rows, __version__
from ._publish import publish, publish_tables

__all__ = [
    "Client",
    "Rows",
    "publish",
    "publish_tables",
    "__version__",
    "HoppsError",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
