//! `all`: every suite with its default sizes (or its small ones with `--quick`), one after the
//! other, in one process: `hopps-bench all --quick --json` is what CI runs to prove the harness
//! works end to end.
//!
//! The `cluster` suite runs here only with `--quick` (about 10 s in a debug build): its full
//! form loads a million rows into seven nodes and times several failovers, so it runs on its
//! own (`hopps-bench cluster`).

use clap::{Args, Command, FromArgMatches};

use crate::servers::{Sides, SystemArgs, runtime};
use crate::{cluster, load, lookup, memory, rollback, table, wal};

/// Flags of `all`: those every side-by-side suite shares; each suite keeps its defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct AllArgs {
    #[command(flatten)]
    pub system: SystemArgs,
    /// Skip the table suite (it needs several GiB of memory at full size).
    #[arg(long)]
    pub no_table: bool,
}

/// A suite's flags as if none were given on the command line (its defaults).
fn defaults<A: Args + FromArgMatches>(name: &'static str) -> anyhow::Result<A> {
    let matches = A::augment_args(Command::new(name)).try_get_matches_from([name])?;
    Ok(A::from_arg_matches(&matches)?)
}

pub fn run(args: &AllArgs, options: crate::Options) -> anyhow::Result<()> {
    if !args.no_table {
        table::run(&defaults::<table::TableArgs>("table")?, options)?;
    }
    let sides = Sides::resolve(&args.system, options.quick, options.json)?;
    let rt = runtime()?;
    rt.block_on(lookup::suite(&sides, &defaults("lookup")?))?;
    rt.block_on(memory::suite(&sides, &defaults("memory")?))?;
    rt.block_on(load::suite(&sides, &defaults("load")?))?;
    rt.block_on(rollback::suite(&sides, &defaults("rollback")?))?;
    rt.block_on(wal::suite(&sides, &defaults("wal")?))?;
    if options.quick {
        rt.block_on(cluster::suite(
            &sides.hopps_bin,
            &defaults("cluster")?,
            options,
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_suite_has_defaults() {
        let l: lookup::LookupArgs = defaults("lookup").expect("lookup");
        assert!(l.keys.is_none() && l.system.rounds == 5);
        let w: wal::WalArgs = defaults("wal").expect("wal");
        assert!(w.wal_sync.is_none());
        defaults::<memory::MemoryArgs>("memory").expect("memory");
        defaults::<load::LoadArgs>("load").expect("load");
        defaults::<rollback::RollbackArgs>("rollback").expect("rollback");
        defaults::<table::TableArgs>("table").expect("table");
        let c: cluster::ClusterArgs = defaults("cluster").expect("cluster");
        assert!(c.rows.is_none() && c.batch == 1000 && c.lease_ttl == "2s");
    }
}
