//! The controller's rule for a model's serving version (the second phase of a switch).
//!
//! Let S be the alive nodes placed on the model that serve part of it (their report is not
//! "loading", and they hold shards and can read a version: a node whose first load failed
//! serves nothing a client could be sent to, so it does not hold the cluster back), avail(n) their
//! readable versions plus the staged one, and I the versions every node of S has available.
//! - No serving record yet: commit max(I).
//! - A node of S staged a version t other than the current one and t is in I: commit t (forward
//!   switches and rollbacks both stage their target first).
//! - No node of S can serve the current version any more: commit max(I).
//!
//! Invariant: a committed version is available on every node of S, so no client pinned to it
//! is turned away by a node that finished loading.

use std::collections::BTreeSet;

use hopps_cluster::{ClusterState, ModelReport};

/// The version to record as serving for `model`, when it should change.
pub(crate) fn decide(state: &ClusterState, model: &str) -> Option<u64> {
    let placement = state.placements.get(model)?;
    let placed: BTreeSet<&str> = placement
        .assignment
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let members: Vec<&ModelReport> = placed
        .into_iter()
        .filter_map(|n| state.report(model, n))
        .filter(|r| r.state != "loading" && !r.held.is_empty() && !r.readable.is_empty())
        .collect();
    rule(state.serving_version(model), &members)
}

/// The rule itself, over the reports of S.
pub(crate) fn rule(current: Option<u64>, members: &[&ModelReport]) -> Option<u64> {
    let avail =
        |r: &ModelReport| -> BTreeSet<u64> { r.readable.iter().copied().chain(r.staged).collect() };
    let mut common: Option<BTreeSet<u64>> = None;
    for r in members {
        let a = avail(r);
        common = Some(match common {
            None => a,
            Some(c) => c.intersection(&a).copied().collect(),
        });
    }
    let common = common.unwrap_or_default();
    let Some(current) = current else {
        return common.last().copied();
    };
    let staged_target = members
        .iter()
        .filter_map(|r| r.staged)
        .filter(|t| *t != current && common.contains(t))
        .max();
    if staged_target.is_some() {
        return staged_target;
    }
    let anyone_serves_current = members.iter().any(|r| avail(r).contains(&current));
    if !members.is_empty() && !anyone_serves_current {
        return common.last().copied().filter(|v| *v != current);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(readable: &[u64], staged: Option<u64>) -> ModelReport {
        ModelReport {
            node: "n".into(),
            model: "m".into(),
            shards: 4,
            held: vec![0],
            loading: vec![],
            serving: readable.last().copied(),
            readable: readable.to_vec(),
            staged,
            state: "serving".into(),
            error: None,
            memory_bytes: 0,
            table_bytes: 0,
            rows: 0,
        }
    }

    #[test]
    fn first_record_is_the_newest_common_version() {
        let a = report(&[1, 2], None);
        let b = report(&[1], Some(2));
        assert_eq!(rule(None, &[&a, &b]), Some(2));
        let c = report(&[1], None);
        assert_eq!(rule(None, &[&a, &c]), Some(1));
        assert_eq!(rule(None, &[]), None, "nobody to serve it yet");
        let d = report(&[3], None);
        assert_eq!(rule(None, &[&c, &d]), None, "nothing in common");
    }

    #[test]
    fn switch_waits_until_every_node_has_the_staged_version() {
        let staged = report(&[1, 2], Some(2));
        let behind = report(&[1], None);
        assert_eq!(rule(Some(1), &[&staged, &behind]), None);
        let caught_up = report(&[1, 2], Some(2));
        assert_eq!(rule(Some(1), &[&staged, &caught_up]), Some(2));
        // Already serving it: nothing to do.
        assert_eq!(rule(Some(2), &[&staged, &caught_up]), None);
    }

    #[test]
    fn rollback_stages_its_target_too() {
        let a = report(&[2, 3], Some(2));
        let b = report(&[2, 3], Some(2));
        assert_eq!(rule(Some(3), &[&a, &b]), Some(2));
    }

    #[test]
    fn lost_current_version_falls_back_to_the_newest_common() {
        let a = report(&[4], None);
        let b = report(&[4, 5], None);
        assert_eq!(rule(Some(3), &[&a, &b]), Some(4));
        // Someone still serves 3: keep it.
        let c = report(&[3, 4], None);
        assert_eq!(rule(Some(3), &[&a, &c]), None);
    }

    #[test]
    fn a_node_that_serves_nothing_does_not_hold_the_cluster_back() {
        let mut state = ClusterState::default();
        state.placements.insert(
            "m".into(),
            hopps_cluster::Placement {
                model: "m".into(),
                shards: 2,
                replicas: 2,
                epoch: 1,
                assignment: vec![vec!["a".into(), "b".into()], vec!["a".into(), "b".into()]],
            },
        );
        for id in ["a", "b"] {
            state.nodes.insert(
                id.into(),
                hopps_cluster::NodeRecord {
                    id: id.into(),
                    grpc_addr: format!("{id}:1"),
                    admin_addr: String::new(),
                    memory_limit_bytes: 0,
                    memory_used_bytes: 0,
                    healthy: true,
                    started_unix: 0.0,
                    build: String::new(),
                },
            );
        }
        let a = ModelReport {
            node: "a".into(),
            held: vec![0, 1],
            ..report(&[1], None)
        };
        // b's first load failed: no shard held, nothing readable.
        let b = ModelReport {
            node: "b".into(),
            held: vec![],
            readable: vec![],
            serving: None,
            state: "failed".into(),
            ..report(&[], None)
        };
        let reports = state.reports.entry("m".into()).or_default();
        reports.insert("a".into(), a);
        reports.insert("b".into(), b);
        assert_eq!(decide(&state, "m"), Some(1));
    }
}
