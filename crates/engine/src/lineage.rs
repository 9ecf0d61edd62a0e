//! Which versions a model serves, decided from the repository alone.
//!
//! Every node and the CLI compute the same answer from the same two inputs: the committed
//! manifests and the append-only history. A `rolled_back` record `{version: T, from_version: F}`
//! makes every version in `(T, F]` *dead*: it is never served again, and a delta whose parent
//! is dead is never applied. The served chain is then
//!
//! - a full version starts a new chain (a newer full replaces everything before it);
//! - a delta extends the chain when its parent is the chain's tip, and is skipped otherwise
//!   (a branch off an older version, or a delta published against a rolled-back version).

use hopps_format::{HistoryRecord, Manifest, VersionKind};

/// History event names the engine writes.
pub(crate) const EVENT_SERVED: &str = "served";
pub(crate) const EVENT_ROLLED_BACK: &str = "rolled_back";

/// The served chain of a model and the versions rolled back over.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lineage {
    /// A full version followed by deltas, each the child of the one before.
    pub chain: Vec<Manifest>,
    /// Ranges `(to, from]` of rolled-back versions.
    pub dead: Vec<(u64, u64)>,
    /// Committed deltas that do not extend the chain (their parent is not its tip).
    pub skipped: Vec<u64>,
}

impl Lineage {
    /// `committed` ascending by version (as the repository lists them).
    pub(crate) fn compute(committed: &[Manifest], history: &[HistoryRecord]) -> Lineage {
        let dead: Vec<(u64, u64)> = history
            .iter()
            .filter(|r| r.event == EVENT_ROLLED_BACK)
            .filter_map(|r| r.from_version.map(|f| (r.version, f)))
            .filter(|(to, from)| to < from)
            .collect();
        let is_dead = |v: u64| dead.iter().any(|&(to, from)| v > to && v <= from);
        let mut chain: Vec<Manifest> = Vec::new();
        let mut skipped = Vec::new();
        for m in committed {
            if is_dead(m.version) {
                continue;
            }
            match m.kind {
                VersionKind::Full => chain = vec![m.clone()],
                VersionKind::Delta => {
                    let tip = chain.last().map(|t| t.version);
                    if tip.is_some() && m.parent == tip {
                        chain.push(m.clone());
                    } else {
                        skipped.push(m.version);
                    }
                }
                VersionKind::Checkpoint => {}
            }
        }
        Lineage {
            chain,
            dead,
            skipped,
        }
    }

    pub(crate) fn is_dead(&self, v: u64) -> bool {
        self.dead.iter().any(|&(to, from)| v > to && v <= from)
    }

    /// The newest version this node would serve: the chain's tip. Versions rolled back over
    /// and deltas off the chain are never applied, so they are not counted as pending.
    pub(crate) fn tip(&self) -> Option<u64> {
        self.chain.last().map(|m| m.version)
    }

    pub(crate) fn position(&self, v: u64) -> Option<usize> {
        self.chain.iter().position(|m| m.version == v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn manifest(version: u64, kind: VersionKind, parent: Option<u64>) -> Manifest {
        Manifest {
            format_version: 1,
            model: "m".into(),
            version,
            kind,
            parent,
            created: String::new(),
            source: String::new(),
            rows: 0,
            wal_sequence: None,
            tables: vec![],
        }
    }

    fn rolled_back(to: u64, from: u64) -> HistoryRecord {
        HistoryRecord {
            seq: 0,
            time: String::new(),
            event: EVENT_ROLLED_BACK.into(),
            version: to,
            from_version: Some(from),
            node: "n".into(),
            detail: String::new(),
        }
    }

    fn chain(l: &Lineage) -> Vec<u64> {
        l.chain.iter().map(|m| m.version).collect()
    }

    #[test]
    fn full_then_deltas_then_newer_full() {
        use VersionKind::*;
        let c = vec![
            manifest(1, Full, None),
            manifest(2, Delta, Some(1)),
            manifest(3, Delta, Some(2)),
            manifest(4, Delta, Some(1)),
        ];
        let l = Lineage::compute(&c, &[]);
        assert_eq!(chain(&l), vec![1, 2, 3]);
        assert_eq!(l.skipped, vec![4]);
        let mut c2 = c.clone();
        c2.push(manifest(5, Full, None));
        c2.push(manifest(6, Delta, Some(5)));
        assert_eq!(chain(&Lineage::compute(&c2, &[])), vec![5, 6]);
    }

    #[test]
    fn rolled_back_versions_are_never_served_again() {
        use VersionKind::*;
        // served 5, 6, 7; rolled back to 5; then 8 (parent 5) and 9 (parent 7, stale publisher).
        let c = vec![
            manifest(5, Full, None),
            manifest(6, Delta, Some(5)),
            manifest(7, Delta, Some(6)),
            manifest(8, Delta, Some(5)),
            manifest(9, Delta, Some(7)),
            manifest(10, Delta, Some(8)),
        ];
        let l = Lineage::compute(&c, &[rolled_back(5, 7)]);
        assert_eq!(chain(&l), vec![5, 8, 10]);
        assert!(l.is_dead(6) && l.is_dead(7) && !l.is_dead(8));
        assert_eq!(l.skipped, vec![9]);
        assert_eq!(l.tip(), Some(10));
    }
}
