//! hopps-client: the Rust client of a hopps node (`hopps.v1` over gRPC).
//!
//! ```no_run
//! # async fn example() -> Result<(), hopps_client::ClientError> {
//! let client = hopps_client::Client::connect("127.0.0.1:7070").await?;
//! let rows = client.lookup("ctr", "user", &[1, 2, 3]).await?;
//! println!("served at version {}: first row {:?}", rows.version, rows.row(0));
//! # Ok(()) }
//! ```
//!
//! In cluster mode, [`ClusterClient`] finds the nodes through etcd and routes each key to a
//! ready replica of its shard, all at the version the cluster serves:
//!
//! ```no_run
//! # async fn example() -> Result<(), hopps_client::ClientError> {
//! let cluster = hopps_client::ClusterClient::connect("127.0.0.1:2379", "prod").await?;
//! let rows = cluster.lookup("ctr", "user", &[1, 2, 3]).await?;
//! println!("served at version {}: {:?}", rows.version, cluster.stats());
//! # Ok(()) }
//! ```
//!
//! API boundary: callers see only this crate's types ([`Rows`], [`NodeStatus`], ...); the wire
//! types of `hopps-proto` are converted here. The Python binding and the C ABI wrap this crate,
//! so every error carries the gRPC code and the server's message ([`ClientError::code`]).
#![forbid(unsafe_code)]

mod cluster;
mod error;
mod types;

use std::time::Duration;

use hopps_proto::packed;
use hopps_proto::v1;
use hopps_proto::v1::admin_client::AdminClient;
use hopps_proto::v1::hopps_client::HoppsClient;
use tonic::transport::{Channel, Endpoint};

pub use cluster::{ClusterClient, ClusterOptions, ClusterStats, ClusterStatus};
pub use error::ClientError;
pub use tonic::Code;
pub use types::{
    CheckpointReport, HistoryEvent, LoadProgress, ModelInfo, ModelStatus, MultiRows, NodeStatus,
    RollbackReport, Rows, TableInfo, TableRows, VersionInfo, WriteAck,
};

/// HTTP/2 flow-control window of one call.
const STREAM_WINDOW_BYTES: u32 = 4 << 20;
/// HTTP/2 flow-control window of one connection (shared by its concurrent calls).
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// How a [`Client`] connects and how large its messages may be.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time to establish the connection before [`Client::connect_with`] fails.
    pub connect_timeout: Duration,
    /// Deadline of each call; `None` waits as long as the server takes.
    pub request_timeout: Option<Duration>,
    /// Largest message the client sends or accepts.
    pub max_message_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(Duration::from_secs(60)),
            max_message_bytes: 256 << 20,
        }
    }
}

/// A connection to one hopps node. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    hopps: HoppsClient<Channel>,
    admin: AdminClient<Channel>,
}

/// `host:port` or `http://host:port` → the URI tonic expects.
fn endpoint_uri(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

impl Client {
    /// Connects to the node at `addr` (`host:port` or `http://host:port`) with default options.
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        Client::connect_with(addr, &ClientOptions::default()).await
    }

    /// Connects to the node at `addr` with `options`.
    pub async fn connect_with(addr: &str, options: &ClientOptions) -> Result<Client, ClientError> {
        let endpoint = Client::endpoint(addr, options)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        Ok(Client::over(addr, channel, options))
    }

    /// A client whose connection is made on its first call (and remade after a failure), so
    /// a cluster client can keep one per node without waiting for nodes it may never call.
    pub(crate) fn connect_lazy(addr: &str, options: &ClientOptions) -> Result<Client, ClientError> {
        let endpoint = Client::endpoint(addr, options)?;
        Ok(Client::over(addr, endpoint.connect_lazy(), options))
    }

    fn endpoint(addr: &str, options: &ClientOptions) -> Result<Endpoint, ClientError> {
        let uri = endpoint_uri(addr);
        let mut endpoint =
            Endpoint::from_shared(uri).map_err(|err| ClientError::InvalidAddress {
                addr: addr.to_string(),
                reason: err.to_string(),
            })?;
        // Replies of a 1000-key lookup are tens of KiB: HTTP/2's default 64 KiB windows would
        // stall them on window updates, so the windows are sized for batches.
        endpoint = endpoint
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES));
        if let Some(timeout) = options.request_timeout {
            endpoint = endpoint.timeout(timeout);
        }
        Ok(endpoint)
    }

    fn over(addr: &str, channel: Channel, options: &ClientOptions) -> Client {
        let limit = options.max_message_bytes;
        Client {
            addr: addr.to_string(),
            hopps: HoppsClient::new(channel.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            admin: AdminClient::new(channel)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        }
    }

    /// The address this client was connected to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Rows of `table` in `model` for `keys`, at the version the node serves by default.
    pub async fn lookup(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
    ) -> Result<Rows, ClientError> {
        self.lookup_at(model, table, keys, None).await
    }

    /// Rows of `table` in `model` for `keys`, pinned to `version` when given.
    ///
    /// A pinned version the node can no longer read fails with `FAILED_PRECONDITION`.
    pub async fn lookup_at(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        version: Option<u64>,
    ) -> Result<Rows, ClientError> {
        let request = v1::LookupRequest {
            model: model.to_string(),
            table: table.to_string(),
            keys: packed::pack_keys(keys),
            version,
        };
        let response = self
            .hopps
            .clone()
            .lookup(request)
            .await
            .map_err(ClientError::from)?
            .into_inner();
        Rows::from_wire(
            response.version,
            response.dim,
            response.count,
            &response.values,
            &response.found,
            keys.len(),
        )
        .map_err(|reason| ClientError::Protocol {
            what: format!("lookup of model {model:?} table {table:?}"),
            reason,
        })
    }

    /// Rows of several tables of `model` in one call, all read at one version.
    pub async fn multi_lookup(
        &self,
        model: &str,
        tables: &[(&str, &[u64])],
        version: Option<u64>,
    ) -> Result<MultiRows, ClientError> {
        let request = v1::MultiLookupRequest {
            model: model.to_string(),
            tables: tables
                .iter()
                .map(|(table, keys)| v1::TableKeys {
                    table: (*table).to_string(),
                    keys: packed::pack_keys(keys),
                })
                .collect(),
            version,
        };
        let response = self
            .hopps
            .clone()
            .multi_lookup(request)
            .await
            .map_err(ClientError::from)?
            .into_inner();
        if response.tables.len() != tables.len() {
            return Err(ClientError::Protocol {
                what: format!("multi-lookup of model {model:?}"),
                reason: format!(
                    "asked for {} tables, got {}",
                    tables.len(),
                    response.tables.len()
                ),
            });
        }
        let mut out = Vec::with_capacity(tables.len());
        for (wire, (table, keys)) in response.tables.iter().zip(tables) {
            let rows = Rows::from_wire(
                response.version,
                wire.dim,
                wire.count,
                &wire.values,
                &wire.found,
                keys.len(),
            )
            .map_err(|reason| ClientError::Protocol {
                what: format!("multi-lookup of model {model:?} table {table:?}"),
                reason,
            })?;
            out.push(TableRows {
                table: wire.table.clone(),
                rows,
            });
        }
        Ok(MultiRows {
            version: response.version,
            tables: out,
        })
    }

    /// Inserts or overwrites rows; `values` holds `keys.len() * dim` floats, row after row.
    /// Durable on the node once acknowledged.
    pub async fn upsert(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        values: &[f32],
    ) -> Result<WriteAck, ClientError> {
        let request = v1::UpsertRequest {
            model: model.to_string(),
            table: table.to_string(),
            keys: packed::pack_keys(keys),
            values: packed::pack_values(values),
        };
        let response = self.hopps.clone().upsert(request).await?.into_inner();
        Ok(WriteAck::from(response))
    }

    /// Removes rows.
    pub async fn delete(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
    ) -> Result<WriteAck, ClientError> {
        let request = v1::DeleteRequest {
            model: model.to_string(),
            table: table.to_string(),
            keys: packed::pack_keys(keys),
        };
        let response = self.hopps.clone().delete(request).await?.into_inner();
        Ok(WriteAck::from(response))
    }

    /// Applies gradients (`keys.len() * dim` floats) with the table's server-side optimizer.
    pub async fn push(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        gradients: &[f32],
    ) -> Result<WriteAck, ClientError> {
        let request = v1::PushRequest {
            model: model.to_string(),
            table: table.to_string(),
            keys: packed::pack_keys(keys),
            gradients: packed::pack_values(gradients),
        };
        let response = self.hopps.clone().push(request).await?.into_inner();
        Ok(WriteAck::from(response))
    }

    /// Models the node holds, with their tables.
    pub async fn list_models(&self) -> Result<Vec<ModelInfo>, ClientError> {
        let response = self
            .admin
            .clone()
            .list_models(v1::ListModelsRequest {})
            .await?
            .into_inner();
        Ok(response.models.into_iter().map(ModelInfo::from).collect())
    }

    /// Versions of `model` as the node sees them (committed, serving, rolled back, ...).
    pub async fn versions(&self, model: &str) -> Result<Vec<VersionInfo>, ClientError> {
        let response = self
            .admin
            .clone()
            .versions(v1::VersionsRequest {
                model: model.to_string(),
            })
            .await?
            .into_inner();
        Ok(response
            .versions
            .into_iter()
            .map(VersionInfo::from)
            .collect())
    }

    /// The node's status: readiness, memory, and per model its versions and load progress.
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        let response = self
            .admin
            .clone()
            .status(v1::StatusRequest {})
            .await?
            .into_inner();
        Ok(NodeStatus::from(response))
    }

    /// Rolls `model` back to version `to`; returns once the node serves it.
    pub async fn rollback(&self, model: &str, to: u64) -> Result<RollbackReport, ClientError> {
        let response = self
            .admin
            .clone()
            .rollback(v1::RollbackRequest {
                model: model.to_string(),
                to_version: to,
            })
            .await?
            .into_inner();
        Ok(RollbackReport::from(response))
    }

    /// What `model` served, and when: versions served and rollbacks, oldest first.
    pub async fn history(&self, model: &str) -> Result<Vec<HistoryEvent>, ClientError> {
        let response = self
            .admin
            .clone()
            .history(v1::HistoryRequest {
                model: model.to_string(),
            })
            .await?
            .into_inner();
        Ok(response
            .events
            .into_iter()
            .map(HistoryEvent::from)
            .collect())
    }

    /// Writes a checkpoint of the version the node serves for `model`.
    pub async fn checkpoint(&self, model: &str) -> Result<CheckpointReport, ClientError> {
        let response = self
            .admin
            .clone()
            .checkpoint(v1::CheckpointRequest {
                model: model.to_string(),
            })
            .await?
            .into_inner();
        Ok(CheckpointReport::from(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_a_scheme() {
        assert_eq!(endpoint_uri("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(endpoint_uri("http://h:1"), "http://h:1");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        // Bind then drop a listener: the port is free and nothing accepts on it.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let options = ClientOptions {
            connect_timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        };
        let err = Client::connect_with(&format!("127.0.0.1:{port}"), &options)
            .await
            .expect_err("nothing listens there");
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&port.to_string()), "{err}");
        assert_eq!(err.code(), Some(Code::Unavailable));
    }

    #[tokio::test]
    async fn a_malformed_address_is_rejected() {
        let err = Client::connect("not an address\n")
            .await
            .expect_err("malformed");
        assert!(matches!(err, ClientError::InvalidAddress { .. }), "{err}");
    }
}
