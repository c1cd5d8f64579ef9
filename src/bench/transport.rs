//! Scenario 5: bulk throughput of Ferry's QUIC link beside a plain quinn stream with default
//! settings and beside one TCP stream, on loopback in the same run. The measurement is the
//! library's (`ferry_appliance::io::transport::bench`, also behind `cargo bench --bench
//! transport`); this module only sizes it and turns its runs into figures.

use ferry_appliance::io::transport::bench::{self, BenchOptions, Link};

use super::figure::{Better, Figure};
use super::Env;

pub const STEPS: u64 = 1;

pub fn run(env: &Env) -> anyhow::Result<Vec<Figure>> {
    let options = BenchOptions {
        total_bytes: env.size.pick(16 << 20, 64 << 20, 1 << 30),
        rounds: env.size.pick(1, 1, 3),
        ..BenchOptions::default()
    };
    env.progress.step(&format!(
        "{} MiB per link, {} round(s), links interleaved",
        options.total_bytes >> 20,
        options.rounds
    ));
    let runs = bench::run(&options)?;
    let rate = |link: Link| bench::median_gigabytes_per_s(&runs, link);
    let ferry = rate(Link::Ferry).ok_or_else(|| anyhow::anyhow!("no run of Ferry's link"))?;
    let lost = |link: Link| -> u64 {
        runs.iter()
            .filter(|run| run.link == link)
            .filter_map(|run| run.lost_packets)
            .sum()
    };
    let cpu = |link: Link| bench::median_cpu_seconds_per_gigabyte(&runs, link).unwrap_or(0.0);
    let cpu_note = format!(
        "cpu-s per GB (both sides): Ferry {:.2}, plain quinn {:.2}, TCP {:.2}",
        cpu(Link::Ferry),
        cpu(Link::PlainQuinn),
        cpu(Link::Tcp)
    );
    env.log(&format!(
        "  transport: ferry {ferry:.3} GB/s, plain quinn {:.3}, TCP {:.3}; lost packets ferry {}, quinn {}; {cpu_note}",
        rate(Link::PlainQuinn).unwrap_or(0.0),
        rate(Link::Tcp).unwrap_or(0.0),
        lost(Link::Ferry),
        lost(Link::PlainQuinn)
    ));
    let name = format!(
        "transport bulk throughput, {} MiB of 1 MiB frames, median of {}",
        options.total_bytes >> 20,
        options.rounds
    );
    Ok(vec![
        Figure::new(&name, ferry, "GB/s", Better::Higher)
            .against(
                "plain quinn stream, default settings",
                rate(Link::PlainQuinn),
            )
            .aim("≥ 1.0x plain quinn", 1.0)
            .note(format!(
                "lost packets: Ferry {}, plain quinn {}",
                lost(Link::Ferry),
                lost(Link::PlainQuinn)
            ))
            .note(cpu_note),
        Figure::new(&name, ferry, "GB/s", Better::Higher)
            .against("one TCP stream, unencrypted", rate(Link::Tcp)),
    ])
}
