//! Transport throughput (issue 7, scenario 5): Ferry's tuned QUIC link beside plain quinn with
//! default settings and beside TCP, on loopback in the same run. Run in release:
//! `cargo bench --bench transport` (`-- --quick` for a smoke run). Prints a markdown table.

use ferry_appliance::io::transport::bench::{self, BenchOptions, Link};

fn main() -> anyhow::Result<()> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let quick = arguments.iter().any(|argument| argument == "--quick");
    let mut options = BenchOptions::default();
    if quick {
        options.total_bytes = 64 << 20;
        options.rounds = 1;
    }
    if let Some(rounds) = environment_number("FERRY_BENCH_ROUNDS") {
        options.rounds = rounds as u32;
    }
    if let Some(mebibytes) = environment_number("FERRY_BENCH_MIB") {
        options.total_bytes = mebibytes << 20;
    }
    // Experiment knobs: path MTU discovery up to this UDP payload size.
    if let Some(mtu_max) = environment_number("FERRY_BENCH_MTU_MAX") {
        options.tuning.max_udp_payload_bytes = mtu_max as u16;
        options.tuning.mtu_discovery_upper_bound = Some(mtu_max as u16);
    }
    if let Some(mebibytes) = environment_number("FERRY_BENCH_SOCKET_MIB") {
        options.tuning.socket_buffer_bytes = (mebibytes << 20) as usize;
    }
    if let Some(mebibytes) = environment_number("FERRY_BENCH_STREAM_WINDOW_MIB") {
        options.tuning.stream_receive_window_bytes = (mebibytes << 20) as u32;
    }
    if let Some(mebibytes) = environment_number("FERRY_BENCH_SEND_WINDOW_MIB") {
        options.tuning.send_window_bytes = mebibytes << 20;
    }
    if let Ok(only) = std::env::var("FERRY_BENCH_ONLY") {
        options.links = match only.as_str() {
            "ferry" => vec![Link::Ferry],
            "quinn" => vec![Link::PlainQuinn],
            "tcp" => vec![Link::Tcp],
            other => anyhow::bail!("FERRY_BENCH_ONLY={other}: expected ferry, quinn or tcp"),
        };
    }
    if let Some(initial_mtu) = environment_number("FERRY_BENCH_INITIAL_MTU") {
        options.tuning.initial_mtu = initial_mtu as u16;
    }
    eprintln!(
        "transport bench: {} MiB of {} KiB frames per run, {} rounds",
        options.total_bytes >> 20,
        options.frame_bytes >> 10,
        options.rounds
    );
    let runs = bench::run(&options)?;
    for run in &runs {
        eprintln!(
            "  {:<45} {:>6.3} GB/s  {:>8.3} s  {:>5.2} cpu-s/GB  lost packets {}",
            run.link.name(),
            run.gigabytes_per_s(),
            run.elapsed.as_secs_f64(),
            run.cpu_seconds_per_gigabyte(),
            run.lost_packets
                .map_or_else(|| "-".to_owned(), |lost| lost.to_string())
        );
        if let (Some(sender), Some(receiver)) = (run.sender_stats, run.receiver_stats) {
            eprintln!(
                "      sender: {} datagrams in {} sends, {} ACK frames in {} datagrams received, \
                 MTU {}; receiver: {} datagrams in {} receives, {} ACK frames sent in {} datagrams",
                sender.udp_tx.datagrams,
                sender.udp_tx.ios,
                sender.frame_rx.acks,
                sender.udp_rx.datagrams,
                sender.path.current_mtu,
                receiver.udp_rx.datagrams,
                receiver.udp_rx.ios,
                receiver.frame_tx.acks,
                receiver.udp_tx.datagrams,
            );
        }
    }
    let ferry = bench::median_gigabytes_per_s(&runs, Link::Ferry).unwrap_or(0.0);
    println!(
        "| link | GB/s (median of {}) | Ferry / link | cpu-s per GB (median) |",
        options.rounds
    );
    println!("|---|---|---|---|");
    for link in [Link::Ferry, Link::PlainQuinn, Link::Tcp] {
        let rate = bench::median_gigabytes_per_s(&runs, link).unwrap_or(0.0);
        let cpu = bench::median_cpu_seconds_per_gigabyte(&runs, link).unwrap_or(0.0);
        println!(
            "| {} | {:.3} ({:.2} Gbit/s) | {:.2}x | {:.2} |",
            link.name(),
            rate,
            rate * 8.0,
            ferry / rate,
            cpu
        );
    }
    let lost = |link: Link| -> u64 {
        runs.iter()
            .filter(|run| run.link == link)
            .filter_map(|run| run.lost_packets)
            .sum()
    };
    println!(
        "\nLost packets over all rounds: ferry {}, plain quinn {}.",
        lost(Link::Ferry),
        lost(Link::PlainQuinn)
    );
    Ok(())
}

fn environment_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}
