//! Scenario 7: failover time to a readable export of a 4 GiB disk at a recovery point 1 GiB of
//! writes back. Needs `ferry failover` (issue 5); a build without it reports so.

use super::figure::Figure;
use super::Env;

pub const STEPS: u64 = 1;

pub fn run(env: &Env) -> anyhow::Result<Vec<Figure>> {
    env.progress.step("failover");
    Ok(vec![Figure::failed(
        "failover to a readable export, 4 GiB disk, point 1 GiB of writes back",
        "not available in this build: `ferry failover` (issue 5) is not in this binary",
    )])
}
