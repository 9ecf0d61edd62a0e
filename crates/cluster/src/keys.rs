//! Where each record lives. Every key of cluster `C` starts with `/hopps/C/`:
//!
//! | key | record | written by | lease |
//! |---|---|---|---|
//! | `nodes/<node>` | [`NodeRecord`](crate::NodeRecord) | the node | the node's |
//! | `reports/<model>/<node>` | [`ModelReport`](crate::ModelReport) | the node | the node's |
//! | `placement/<model>` | [`Placement`](crate::Placement) | the controller | none |
//! | `serving/<model>` | [`Serving`](crate::Serving) | the controller | none |
//! | `drain/<node>` | [`Drain`](crate::Drain) | `hopps node drain`, then the controller | none |
//! | `models/<model>` | [`ModelSettings`](crate::ModelSettings) | `hopps model replicas` | none |
//! | `election` | (etcd election: the controller's leadership) | nodes | the node's |

/// The key layout of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

/// What a key under the cluster's root stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    Node(String),
    Report {
        model: String,
        node: String,
    },
    Placement(String),
    Serving(String),
    Drain(String),
    Settings(String),
    /// The election's own keys and anything this version does not know.
    Other,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            root: format!("/hopps/{cluster}/"),
        }
    }

    /// The prefix of every key of the cluster.
    pub fn root(&self) -> &str {
        &self.root
    }
    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.root)
    }
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.root)
    }
    pub fn report(&self, model: &str, node: &str) -> String {
        format!("{}reports/{model}/{node}", self.root)
    }
    pub fn reports(&self) -> String {
        format!("{}reports/", self.root)
    }
    pub fn placement(&self, model: &str) -> String {
        format!("{}placement/{model}", self.root)
    }
    pub fn serving(&self, model: &str) -> String {
        format!("{}serving/{model}", self.root)
    }
    pub fn drain(&self, node: &str) -> String {
        format!("{}drain/{node}", self.root)
    }
    pub fn settings(&self, model: &str) -> String {
        format!("{}models/{model}", self.root)
    }
    /// The etcd election name of the placement controller.
    pub fn election(&self) -> String {
        format!("{}election", self.root)
    }

    /// Parses a key of this cluster.
    pub fn kind(&self, key: &str) -> KeyKind {
        let Some(rest) = key.strip_prefix(&self.root) else {
            return KeyKind::Other;
        };
        let (head, tail) = rest.split_once('/').unwrap_or((rest, ""));
        if tail.is_empty() {
            return KeyKind::Other;
        }
        match head {
            "nodes" => KeyKind::Node(tail.to_string()),
            "placement" => KeyKind::Placement(tail.to_string()),
            "serving" => KeyKind::Serving(tail.to_string()),
            "drain" => KeyKind::Drain(tail.to_string()),
            "models" => KeyKind::Settings(tail.to_string()),
            "reports" => match tail.split_once('/') {
                Some((m, n)) if !m.is_empty() && !n.is_empty() => KeyKind::Report {
                    model: m.to_string(),
                    node: n.to_string(),
                },
                _ => KeyKind::Other,
            },
            _ => KeyKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = Keys::new("c1");
        assert_eq!(k.kind(&k.node("n1")), KeyKind::Node("n1".into()));
        assert_eq!(
            k.kind(&k.report("ctr", "n1")),
            KeyKind::Report {
                model: "ctr".into(),
                node: "n1".into()
            }
        );
        assert_eq!(
            k.kind(&k.placement("ctr")),
            KeyKind::Placement("ctr".into())
        );
        assert_eq!(k.kind(&k.serving("ctr")), KeyKind::Serving("ctr".into()));
        assert_eq!(k.kind(&k.drain("n1")), KeyKind::Drain("n1".into()));
        assert_eq!(k.kind(&k.settings("ctr")), KeyKind::Settings("ctr".into()));
        assert_eq!(k.kind(&format!("{}/abc", k.election())), KeyKind::Other);
        assert_eq!(k.kind("/hopps/c2/nodes/n1"), KeyKind::Other);
    }
}
