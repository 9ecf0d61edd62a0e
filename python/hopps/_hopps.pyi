"""Type stubs of the native module `hopps._hopps` (PyO3 over the Rust client)."""

from typing import (
    Any,
    Iterable,
    Iterator,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypedDict,
    Union,
    final,
    type_check_only,
)

import numpy as np
import numpy.typing as npt

__all__ = ["Client", "Rows", "publish", "rust_lookup_latencies", "__version__"]

__version__: str

#: Keys: a 1-D array of uint64, or anything numpy turns into 1-D non-negative integers.
KeysLike = Union[npt.NDArray[np.uint64], npt.NDArray[np.integer[Any]], Sequence[int], Any]
#: Rows: a 2-D float array of shape (len(keys), dim); converted to float32.
RowsLike = Union[npt.NDArray[np.floating[Any]], Sequence[Sequence[float]], Any]

@type_check_only
class WriteAck(TypedDict):
    version: int
    rows: int
    sequence: int

@type_check_only
class TableInfo(TypedDict):
    name: str
    dim: int
    dtype: str
    missing: str
    rows: int
    capacity: int
    load_factor: float
    bytes: int
    optimizer: Optional[str]

@type_check_only
class ModelInfo(TypedDict):
    name: str
    shards: int
    tables: list[TableInfo]
    serving_version: Optional[int]

@type_check_only
class VersionInfo(TypedDict):
    version: int
    kind: str
    parent: Optional[int]
    rows: int
    created: str
    source: str
    state: str

@type_check_only
class LoadProgress(TypedDict):
    version: int
    rows_done: int
    rows_total: int
    bytes_done: int
    bytes_total: int
    eta_seconds: float
    last_progress_unix: float

@type_check_only
class ModelStatus(TypedDict):
    name: str
    state: str
    serving_version: Optional[int]
    newest_version: Optional[int]
    load: Optional[LoadProgress]
    last_error: Optional[str]
    load_failures: int
    rows: int
    memory_bytes: int
    undo_bytes: int
    load_factor: float
    tables: list[TableInfo]

@type_check_only
class NodeStatus(TypedDict):
    node_id: str
    version: str
    ready: bool
    uptime_seconds: float
    repository: str
    memory_limit_bytes: Optional[int]
    memory_used_bytes: int
    wal_bytes: int
    models: list[ModelStatus]

RollbackReport = TypedDict(  # "from" is a keyword, hence the functional form
    "RollbackReport", {"model": str, "from": int, "to": int, "method": str, "seconds": float}
)

@type_check_only
class HistoryEvent(TypedDict):
    time: str
    event: str
    version: int
    from_version: Optional[int]
    detail: str

@type_check_only
class CheckpointReport(TypedDict):
    model: str
    version: int
    rows: int
    bytes: int
    seconds: float

@type_check_only
class PublishSummary(TypedDict):
    model: str
    version: int
    kind: str
    rows: int

@final
class Rows:
    """Rows of one table: a named pair ``(values, found)`` plus the ``version`` read at.

    ``values`` is float32 of shape (n, dim) and ``found`` bool of shape (n,); both own the
    buffers the client decoded (no copy) and are writable, so ``torch.from_numpy`` shares them.
    """

    @property
    def values(self) -> npt.NDArray[np.float32]: ...
    @property
    def found(self) -> npt.NDArray[np.bool_]: ...
    @property
    def version(self) -> int: ...
    @property
    def dim(self) -> int: ...
    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> npt.NDArray[Any]: ...
    def __iter__(self) -> Iterator[npt.NDArray[Any]]: ...

@type_check_only
class NodeStatusOrError(TypedDict, total=False):
    id: str
    status: NodeStatus
    error: str

@type_check_only
class ClusterStatus(TypedDict):
    """``Client(etcd=..., cluster=...).status()``: the cluster's records as etcd holds them
    (``nodes``, ``placements``, ``reports``, ``serving``, ``drains``, ``settings``, keyed by node
    or model) and each live node's own status."""

    cluster: str
    connected: bool
    revision: int
    nodes: dict[str, dict[str, Any]]
    placements: dict[str, dict[str, Any]]
    reports: dict[str, dict[str, dict[str, Any]]]
    serving: dict[str, dict[str, Any]]
    drains: dict[str, dict[str, Any]]
    settings: dict[str, dict[str, Any]]
    node_status: list[NodeStatusOrError]

@final
class Client:
    """A connection to one hopps node (``Client(addr)``) or to a cluster
    (``Client(etcd="h:p,h:p", cluster="name")``); safe to share between threads.

    Give exactly one of ``addr`` or ``etcd`` and ``cluster``, else :class:`hopps.InvalidArgument`
    (a ``ValueError``). A cluster client reads the placement from etcd and sends each key to a
    ready replica of its shard, with retries and hedged requests; every answer is read at one
    version (the one the cluster serves, or ``version=``). Writes go to every replica of the
    key's shard. ``timeout`` is then the deadline of a whole call, retries included.

    Calls release the GIL while they wait. Connecting fails with :class:`hopps.Unavailable` when
    nothing answers at ``addr`` (or etcd). A client connected before ``fork()`` raises
    :class:`hopps.FailedPrecondition` in the child: connect again there.
    """

    def __new__(
        cls,
        addr: Optional[str] = None,
        *,
        etcd: Optional[str] = None,
        cluster: Optional[str] = None,
        connect_timeout: float = 5.0,
        timeout: Optional[float] = 60.0,
        max_message_bytes: int = 268435456,
    ) -> Client: ...
    @property
    def addr(self) -> Optional[str]:
        """The node's address; ``None`` for a cluster client."""
    @property
    def cluster(self) -> Optional[str]:
        """The cluster's name; ``None`` for a client of one node."""
    def lookup(self, model: str, table: str, keys: KeysLike, *, version: Optional[int] = None) -> Rows:
        """Rows of ``table`` for ``keys``; missing keys follow the table's missing-key policy."""
    def multi_lookup(
        self,
        model: str,
        tables: Union[Mapping[str, KeysLike], Iterable[Tuple[str, KeysLike]]],
        *,
        version: Optional[int] = None,
    ) -> dict[str, Rows]:
        """Rows of several tables of ``model``, all read at one version, in request order."""
    def upsert(self, model: str, table: str, keys: KeysLike, values: RowsLike) -> WriteAck:
        """Inserts or overwrites rows; durable on the node once this returns."""
    def delete(self, model: str, table: str, keys: KeysLike) -> WriteAck:
        """Removes rows."""
    def push(self, model: str, table: str, keys: KeysLike, gradients: RowsLike) -> WriteAck:
        """Applies gradients with the table's server-side optimizer."""
    def list_models(self) -> list[ModelInfo]:
        """The node's models; a cluster client raises :class:`hopps.InvalidArgument`."""
    def versions(self, model: str) -> list[VersionInfo]:
        """Versions as the node (for a cluster: a live node placed on ``model``) sees them."""
    def status(self) -> Union[NodeStatus, ClusterStatus]:
        """The node's status, or for a cluster client the :class:`ClusterStatus`."""
    def rollback(self, model: str, to: int, *, timeout: float = 60.0) -> RollbackReport:
        """Rolls ``model`` back to version ``to``; returns once the node (for a cluster: the
        whole cluster, within ``timeout`` seconds) serves it."""
    def history(self, model: str) -> list[HistoryEvent]:
        """History as the node (for a cluster: a live node placed on ``model``) recorded it."""
    def checkpoint(self, model: str) -> CheckpointReport:
        """A checkpoint on the node; a cluster client raises :class:`hopps.InvalidArgument`."""

def publish(
    repo: str,
    model: str,
    tables: Sequence[Tuple[str, KeysLike, RowsLike, Optional[npt.ArrayLike]]],
    *,
    delta: bool = False,
    parent: Optional[int] = None,
    shards: int = 1,
    dtype: str = "f32",
    missing: str = "zeros",
    random_seed: int = 0,
    random_scale: float = 0.01,
    optimizer: Optional[str] = None,
    learning_rate: float = 0.01,
    allow_non_finite: bool = False,
    source: Optional[str] = None,
    storage_timeout: float = 30.0,
) -> PublishSummary:
    """Low-level publish of (table, keys, values, deleted) entries; use :func:`hopps.publish`."""

def rust_lookup_latencies(
    client: Client, model: str, table: str, keys: KeysLike, iterations: int
) -> list[int]:
    """Nanoseconds of ``iterations`` lookups made by the Rust client alone (benchmark baseline)."""
