//! `hopps.Client`: a connection to one node, over `hopps_client::Client`.
//!
//! Every call converts its numpy arguments while attached to the interpreter, then releases
//! the GIL (`py.detach`) for the whole network wait, then wraps the decoded buffers as numpy
//! arrays without copying them. Keys and rows are copied out of the caller's arrays before the
//! GIL is released: another Python thread may write those arrays meanwhile, and a copy of a
//! batch (8 bytes a key) costs far less than the round trip it precedes.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hopps_client::{ClientOptions, ClusterClient, ClusterOptions};
use numpy::{PyArray1, PyArray2};
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use tokio::runtime::Runtime;

use crate::arrays;
use crate::error::Failure;
use crate::pyobj::to_python;
use crate::runtime::{check_same_process, runtime};

/// The call, model and table an argument error is about; formatted only when there is one.
struct Call<'a> {
    op: &'static str,
    model: &'a str,
    table: Option<&'a str>,
}

impl fmt::Display for Call<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.table {
            Some(table) => write!(f, "{} of model {:?} table {:?}", self.op, self.model, table),
            None => write!(f, "{} of model {:?}", self.op, self.model),
        }
    }
}

fn seconds(value: f64, name: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must be a finite, non-negative number of seconds, got {value}"
        ))
    })
}

/// A connection to one hopps node, or to a cluster of them.
///
/// `Client(addr, *, connect_timeout=5.0, timeout=60.0, max_message_bytes=256 MiB)` connects to
/// `addr` (`host:port` or `http://host:port`) and raises `hopps.Unavailable` when nothing answers
/// there. `Client(etcd="h:p,h:p", cluster="name", ...)` reads the cluster's placement from etcd
/// and sends each key to a ready replica of its shard (retries, hedging, one version per
/// answer). `timeout` is the deadline of each call in seconds (`None`: no deadline; in cluster
/// mode the whole fan-out's deadline, retries included). A client is safe to share between
/// threads; calls release the GIL while they wait.
#[pyclass(frozen, module = "hopps")]
pub(crate) struct Client {
    backend: Backend,
    runtime: Arc<Runtime>,
    /// The process that connected; a forked child must connect again.
    pid: u32,
}

/// What a [`Client`] talks to.
enum Backend {
    // Boxed: the node client is several times the size of the cluster client's handle.
    Node(Box<hopps_client::Client>),
    Cluster {
        client: hopps_client::ClusterClient,
        etcd: String,
        cluster: String,
    },
}

impl Backend {
    fn describe(&self) -> String {
        match self {
            Backend::Node(client) => format!("hopps.Client({:?})", client.addr()),
            Backend::Cluster { etcd, cluster, .. } => {
                format!("hopps.Client(etcd={etcd:?}, cluster={cluster:?})")
            }
        }
    }
}

/// The deadline of a cluster fan-out when the caller asked for none: long, but a request never
/// waits forever for a shard that no node will load.
const CLUSTER_NO_DEADLINE: Duration = Duration::from_secs(3600);

impl Client {
    fn ready(&self) -> Result<(), Failure> {
        check_same_process(self.pid, &self.backend.describe())
    }

    /// A node of the cluster that is placed on `model` and alive, for calls that ask one node
    /// (versions, history).
    async fn node_of(
        client: &hopps_client::ClusterClient,
        model: &str,
    ) -> Result<hopps_client::Client, hopps_client::ClientError> {
        let state = client.state();
        let placed = state
            .placements
            .get(model)
            .map(|p| {
                p.assignment
                    .iter()
                    .flatten()
                    .filter(|n| state.nodes.contains_key(n.as_str()))
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let Some(first) = placed.first() else {
            return Err(hopps_client::ClientError::Status {
                code: hopps_client::Code::NotFound,
                message: format!(
                    "model {model:?} is not placed on any live node of the cluster; publish it \
                     or check `hopps node list`"
                ),
            });
        };
        client.node(first).await
    }

    /// Runs a call of the Rust client with the GIL released.
    fn wait<T, F>(&self, py: Python<'_>, call: F) -> Result<T, Failure>
    where
        F: std::future::Future<Output = Result<T, hopps_client::ClientError>> + Send,
        T: Send,
    {
        self.ready()?;
        let runtime = &self.runtime;
        py.detach(|| runtime.block_on(call)).map_err(Failure::from)
    }
}

/// Copies borrowed keys out of the caller's array (see the module comment for why).
fn owned_keys(obj: &Bound<'_, PyAny>, call: &Call<'_>) -> PyResult<Vec<u64>> {
    let keys = arrays::keys(obj, call)?;
    // Contiguous after conversion, so this is one memcpy.
    Ok(match keys.as_slice() {
        Ok(slice) => slice.to_vec(),
        Err(_) => keys.as_array().iter().copied().collect(),
    })
}

fn owned_rows(
    obj: &Bound<'_, PyAny>,
    rows: usize,
    call: &Call<'_>,
    argument: &str,
) -> PyResult<Vec<f32>> {
    let values = arrays::rows(obj, rows, call, argument)?;
    Ok(match values.as_slice() {
        Ok(slice) => slice.to_vec(),
        Err(_) => values.as_array().iter().copied().collect(),
    })
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (addr = None, *, etcd = None, cluster = None, connect_timeout = 5.0, timeout = Some(60.0), max_message_bytes = 256 << 20))]
    fn new(
        py: Python<'_>,
        addr: Option<&str>,
        etcd: Option<&str>,
        cluster: Option<&str>,
        connect_timeout: f64,
        timeout: Option<f64>,
        max_message_bytes: usize,
    ) -> PyResult<Client> {
        let options = ClientOptions {
            connect_timeout: seconds(connect_timeout, "connect_timeout")?,
            request_timeout: timeout.map(|t| seconds(t, "timeout")).transpose()?,
            max_message_bytes,
        };
        let (pid, runtime) = runtime()?;
        let backend = match (addr, etcd, cluster) {
            (Some(addr), None, None) => {
                let connect = hopps_client::Client::connect_with(addr, &options);
                Backend::Node(Box::new(
                    py.detach(|| runtime.block_on(connect))
                        .map_err(Failure::from)?,
                ))
            }
            (None, Some(etcd), Some(cluster)) => {
                let mut cluster_options = ClusterOptions {
                    sync_timeout: options.connect_timeout,
                    request_timeout: options.request_timeout.unwrap_or(CLUSTER_NO_DEADLINE),
                    ..ClusterOptions::default()
                };
                cluster_options.client.connect_timeout = options.connect_timeout;
                cluster_options.client.max_message_bytes = max_message_bytes;
                let connect = ClusterClient::connect_with(etcd, cluster, cluster_options);
                Backend::Cluster {
                    client: py
                        .detach(|| runtime.block_on(connect))
                        .map_err(Failure::from)?,
                    etcd: etcd.to_string(),
                    cluster: cluster.to_string(),
                }
            }
            _ => return Err(client_arguments(addr, etcd, cluster).into()),
        };
        Ok(Client {
            backend,
            runtime,
            pid,
        })
    }

    /// The address the client was connected to (`None` for a cluster client).
    #[getter]
    fn addr(&self) -> Option<&str> {
        match &self.backend {
            Backend::Node(client) => Some(client.addr()),
            Backend::Cluster { .. } => None,
        }
    }

    /// The cluster's name (`None` for a client of one node).
    #[getter]
    fn cluster(&self) -> Option<&str> {
        match &self.backend {
            Backend::Node(_) => None,
            Backend::Cluster { cluster, .. } => Some(cluster),
        }
    }

    fn __repr__(&self) -> String {
        self.backend.describe()
    }

    /// Rows of `table` in `model` for `keys` (1-D, uint64 or non-negative integers).
    ///
    /// Returns `Rows`: `values` float32 of shape (len(keys), dim), `found` bool of shape
    /// (len(keys),), and the `version` they were read at; `values, found = rows` unpacks it.
    /// Rows of missing keys follow the table's missing-key policy. `version` pins a version.
    #[pyo3(signature = (model, table, keys, *, version = None))]
    fn lookup(
        &self,
        py: Python<'_>,
        model: &str,
        table: &str,
        keys: &Bound<'_, PyAny>,
        version: Option<u64>,
    ) -> PyResult<Rows> {
        let call = Call {
            op: "lookup",
            model,
            table: Some(table),
        };
        let keys = owned_keys(keys, &call)?;
        let rows = match &self.backend {
            Backend::Node(client) => {
                self.wait(py, client.lookup_at(model, table, &keys, version))?
            }
            Backend::Cluster { client, .. } => match version {
                Some(v) => self.wait(py, client.lookup_at(model, table, &keys, v))?,
                None => self.wait(py, client.lookup(model, table, &keys))?,
            },
        };
        Rows::from_client(py, rows, &call)
    }

    /// Rows of several tables of `model`, all read at one version.
    ///
    /// `tables` maps table names to keys (a dict, or pairs `(table, keys)`). Returns a dict from
    /// table name to `Rows`, in request order.
    #[pyo3(signature = (model, tables, *, version = None))]
    fn multi_lookup<'py>(
        &self,
        py: Python<'py>,
        model: &str,
        tables: &Bound<'py, PyAny>,
        version: Option<u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let pairs: Vec<(String, Bound<'py, PyAny>)> = match tables.cast::<PyDict>() {
            Ok(dict) => dict
                .iter()
                .map(|(name, keys)| Ok((name.extract::<String>()?, keys)))
                .collect::<PyResult<_>>()?,
            Err(_) => tables
                .try_iter()?
                .map(|pair| {
                    let pair = pair?;
                    let (name, keys): (String, Bound<'py, PyAny>) = pair.extract()?;
                    Ok((name, keys))
                })
                .collect::<PyResult<_>>()?,
        };
        let mut owned = Vec::with_capacity(pairs.len());
        for (name, keys) in &pairs {
            let call = Call {
                op: "multi-lookup",
                model,
                table: Some(name),
            };
            owned.push((name.as_str(), owned_keys(keys, &call)?));
        }
        let request: Vec<(&str, &[u64])> = owned.iter().map(|(t, k)| (*t, k.as_slice())).collect();
        let answer = match (&self.backend, version) {
            (Backend::Node(client), _) => {
                self.wait(py, client.multi_lookup(model, &request, version))?
            }
            (Backend::Cluster { client, .. }, None) => {
                self.wait(py, client.multi_lookup(model, &request))?
            }
            // Every table pinned to the same version: one version in the answer, as with a node.
            (Backend::Cluster { client, .. }, Some(v)) => self.wait(py, async {
                let mut tables = Vec::with_capacity(request.len());
                for (table, keys) in &request {
                    let rows = client.lookup_at(model, table, keys, v).await?;
                    tables.push(hopps_client::TableRows {
                        table: (*table).to_string(),
                        rows,
                    });
                }
                Ok(hopps_client::MultiRows { version: v, tables })
            })?,
        };
        let out = PyDict::new(py);
        for table in answer.tables {
            let call = Call {
                op: "multi-lookup",
                model,
                table: Some(&table.table),
            };
            let rows = Rows::from_client(py, table.rows, &call)?;
            out.set_item(&table.table, rows)?;
        }
        Ok(out)
    }

    /// Inserts or overwrites rows: `values` has shape (len(keys), dim). Durable on the node once
    /// this returns. Returns `{"version", "rows", "sequence"}`.
    fn upsert(
        &self,
        py: Python<'_>,
        model: &str,
        table: &str,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let call = Call {
            op: "upsert",
            model,
            table: Some(table),
        };
        let keys = owned_keys(keys, &call)?;
        let values = owned_rows(values, keys.len(), &call, "values")?;
        let ack = match &self.backend {
            Backend::Node(client) => self.wait(py, client.upsert(model, table, &keys, &values))?,
            Backend::Cluster { client, .. } => {
                self.wait(py, client.upsert(model, table, &keys, &values))?
            }
        };
        to_python(py, &ack)
    }

    /// Removes rows. Returns `{"version", "rows", "sequence"}`.
    fn delete(
        &self,
        py: Python<'_>,
        model: &str,
        table: &str,
        keys: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let call = Call {
            op: "delete",
            model,
            table: Some(table),
        };
        let keys = owned_keys(keys, &call)?;
        let ack = match &self.backend {
            Backend::Node(client) => self.wait(py, client.delete(model, table, &keys))?,
            Backend::Cluster { client, .. } => self.wait(py, client.delete(model, table, &keys))?,
        };
        to_python(py, &ack)
    }

    /// Applies `gradients` (shape (len(keys), dim)) with the table's server-side optimizer.
    /// Returns `{"version", "rows", "sequence"}`.
    fn push(
        &self,
        py: Python<'_>,
        model: &str,
        table: &str,
        keys: &Bound<'_, PyAny>,
        gradients: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let call = Call {
            op: "push",
            model,
            table: Some(table),
        };
        let keys = owned_keys(keys, &call)?;
        let gradients = owned_rows(gradients, keys.len(), &call, "gradients")?;
        let ack = match &self.backend {
            Backend::Node(client) => self.wait(py, client.push(model, table, &keys, &gradients))?,
            Backend::Cluster { client, .. } => {
                self.wait(py, client.push(model, table, &keys, &gradients))?
            }
        };
        to_python(py, &ack)
    }

    /// Models the node holds, with their tables: a list of dicts. One node's view: a cluster
    /// client raises `hopps.InvalidArgument` (use `status()` for the cluster's models).
    fn list_models(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let client = self.single_node("list_models()")?;
        let models = self.wait(py, client.list_models())?;
        to_python(py, &models)
    }

    /// Versions of `model` as the node sees them (in cluster mode: a live node placed on the
    /// model): a list of dicts with `version`, `kind`, `parent`, `rows`, `created`, `source` and
    /// `state` ("serving", "committed", ...).
    fn versions(&self, py: Python<'_>, model: &str) -> PyResult<Py<PyAny>> {
        let versions = match &self.backend {
            Backend::Node(client) => self.wait(py, client.versions(model))?,
            Backend::Cluster { client, .. } => self.wait(py, async {
                Client::node_of(client, model).await?.versions(model).await
            })?,
        };
        to_python(py, &versions)
    }

    /// The node's status: readiness, memory, and per model the serving and newest versions and
    /// load progress, as a dict. In cluster mode: the cluster's records (`cluster`, `connected`,
    /// `nodes`, `placements`, `reports`, `serving`, `drains`, `settings`) and `node_status`, each
    /// live node's status (or the `error` of asking it).
    fn status(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match &self.backend {
            Backend::Node(client) => {
                let status = self.wait(py, client.status())?;
                to_python(py, &status)
            }
            Backend::Cluster { client, .. } => {
                let status = self.wait(py, client.status())?;
                to_python(py, &status)
            }
        }
    }

    /// Rolls `model` back to version `to`; returns once the node (in cluster mode: the whole
    /// cluster, within `timeout` seconds) serves it, with
    /// `{"model", "from", "to", "method", "seconds"}`.
    #[pyo3(signature = (model, to, *, timeout = 60.0))]
    fn rollback(&self, py: Python<'_>, model: &str, to: u64, timeout: f64) -> PyResult<Py<PyAny>> {
        let report = match &self.backend {
            Backend::Node(client) => self.wait(py, client.rollback(model, to))?,
            Backend::Cluster { client, .. } => {
                let timeout = seconds(timeout, "timeout")?;
                self.wait(py, client.rollback(model, to, timeout))?
            }
        };
        to_python(py, &report)
    }

    /// What `model` served, and when, oldest first (in cluster mode: as a live node placed on
    /// the model recorded it): a list of dicts.
    fn history(&self, py: Python<'_>, model: &str) -> PyResult<Py<PyAny>> {
        let events = match &self.backend {
            Backend::Node(client) => self.wait(py, client.history(model))?,
            Backend::Cluster { client, .. } => self.wait(py, async {
                Client::node_of(client, model).await?.history(model).await
            })?,
        };
        to_python(py, &events)
    }

    /// Writes a checkpoint of the version the node serves for `model`. One node's operation: a
    /// cluster client raises `hopps.InvalidArgument`.
    fn checkpoint(&self, py: Python<'_>, model: &str) -> PyResult<Py<PyAny>> {
        let client = self.single_node("checkpoint()")?;
        let report = self.wait(py, client.checkpoint(model))?;
        to_python(py, &report)
    }
}

impl Client {
    /// The node client of a call that asks one node, or an error saying how to ask one.
    fn single_node(&self, call: &str) -> Result<&hopps_client::Client, Failure> {
        match &self.backend {
            Backend::Node(client) => Ok(&**client),
            Backend::Cluster { .. } => Err(Failure::Input(format!(
                "{call} asks one node, and {} is a cluster client; connect to a node with \
                 hopps.Client(addr) (their grpc_addr: client.status()[\"nodes\"])",
                self.backend.describe()
            ))),
        }
    }
}

/// The error of a `Client(...)` call that names neither a node nor a cluster, or both.
fn client_arguments(addr: Option<&str>, etcd: Option<&str>, cluster: Option<&str>) -> Failure {
    let problem = match (addr, etcd, cluster) {
        (Some(_), _, _) => "addr was given together with etcd/cluster",
        (None, Some(_), None) => "etcd was given without cluster",
        (None, None, Some(_)) => "cluster was given without etcd",
        _ => "neither addr nor etcd and cluster was given",
    };
    Failure::Input(format!(
        "hopps.Client: {problem}; give either addr=\"host:port\" (one node) or \
         etcd=\"host:port[,host:port]\" and cluster=\"name\" (a cluster), not both"
    ))
}

/// Rows of one table: a named pair `(values, found)` plus the `version` they were read at.
///
/// `values` is float32 of shape (n, dim), `found` bool of shape (n,). Both own the buffers the
/// client decoded into (no copy) and are writable, so `torch.from_numpy(rows.values)` shares
/// memory with them.
#[pyclass(frozen, module = "hopps")]
pub(crate) struct Rows {
    #[pyo3(get)]
    values: Py<PyArray2<f32>>,
    #[pyo3(get)]
    found: Py<PyArray1<bool>>,
    /// The version the rows were read at.
    #[pyo3(get)]
    version: u64,
    /// Floats per row.
    #[pyo3(get)]
    dim: u32,
}

impl Rows {
    fn from_client(py: Python<'_>, rows: hopps_client::Rows, call: &Call<'_>) -> PyResult<Rows> {
        let n = rows.found.len();
        let dim = rows.dim;
        let values = arrays::values_array(py, rows.values, n, dim as usize, call)?;
        Ok(Rows {
            values,
            found: arrays::found_array(py, rows.found),
            version: rows.version,
            dim,
        })
    }
}

#[pymethods]
impl Rows {
    /// Always 2: `values, found = rows` unpacks a `Rows` like a tuple.
    fn __len__(&self) -> usize {
        2
    }

    fn __getitem__(&self, py: Python<'_>, index: isize) -> PyResult<Py<PyAny>> {
        match index {
            0 | -2 => Ok(self.values.clone_ref(py).into_any()),
            1 | -1 => Ok(self.found.clone_ref(py).into_any()),
            _ => Err(PyIndexError::new_err(
                "Rows has two items: values (index 0) and found (index 1)",
            )),
        }
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let pair = PyTuple::new(
            py,
            [
                self.values.clone_ref(py).into_any(),
                self.found.clone_ref(py).into_any(),
            ],
        )?;
        pair.try_iter().map(Bound::into_any)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let n = self.found.bind(py).len().unwrap_or(0);
        format!(
            "hopps.Rows(version={}, rows={n}, dim={})",
            self.version, self.dim
        )
    }
}

/// Latencies in nanoseconds of `iterations` lookups of `keys` made by the Rust client alone,
/// on this module's runtime, with the GIL released: the baseline of `bench_lookup.py`.
#[pyfunction]
pub(crate) fn rust_lookup_latencies(
    py: Python<'_>,
    client: &Client,
    model: &str,
    table: &str,
    keys: &Bound<'_, PyAny>,
    iterations: usize,
) -> PyResult<Vec<u64>> {
    let call = Call {
        op: "lookup",
        model,
        table: Some(table),
    };
    let keys = owned_keys(keys, &call)?;
    let backend = &client.backend;
    let latencies = client.wait(py, async {
        let mut latencies = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let start = Instant::now();
            let rows = match backend {
                Backend::Node(c) => c.lookup(model, table, &keys).await?,
                Backend::Cluster { client: c, .. } => c.lookup(model, table, &keys).await?,
            };
            latencies.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
            std::hint::black_box(rows);
        }
        Ok(latencies)
    })?;
    Ok(latencies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_names_one_node_or_one_cluster() {
        for (addr, etcd, cluster, says) in [
            (
                Some("h:1"),
                Some("e:1"),
                Some("c"),
                "addr was given together",
            ),
            (None, Some("e:1"), None, "etcd was given without cluster"),
            (None, None, Some("c"), "cluster was given without etcd"),
            (None, None, None, "neither addr nor etcd"),
        ] {
            let failure = client_arguments(addr, etcd, cluster);
            assert_eq!(
                crate::error::code_of(&failure),
                hopps_client::Code::InvalidArgument
            );
            let message = failure.to_string();
            assert!(message.contains(says), "{message}");
            assert!(
                message.contains("addr=") && message.contains("cluster="),
                "{message}"
            );
        }
    }
}
