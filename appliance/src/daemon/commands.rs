//! Control command dispatch: one arm per `control::Request` variant, run by the event loop that
//! owns the appliance's mutable state. A new command is a new `Request` variant and a new arm
//! here; the match is exhaustive, so the compiler points at this file.

use std::sync::Arc;

use super::status::{DiskStats, StatusModel};
use crate::config::Config;
use crate::control::{DiskSelector, Request, Response};

pub(crate) fn dispatch(config: &Config, status: &StatusModel, request: Request) -> Response {
    match request {
        Request::Status => Response::Status(status.snapshot_now()),
        Request::Pause { selector } => set_paused(status, &selector, true),
        Request::Resume { selector } => set_paused(status, &selector, false),
        Request::SetBandwidth { bytes_per_s } => set_bandwidth(config, status, bytes_per_s),
        // A source answers for the groups it cuts (daemon::points) and a target for the groups
        // in its catalog before this dispatch; what reaches here names where to ask instead.
        Request::CreateRecoveryPoint { group, .. } => error(format!(
            "no consistency group {group:?} is cut here: recovery points are created on the source appliance that coordinates the group"
        )),
        Request::ListRecoveryPoints { group } => error(format!(
            "no recovery points of group {group:?} here: they are listed by the target appliance (its catalog) or by the source appliance that cuts the group"
        )),
        // The target runs these (daemon::target) before this dispatch.
        Request::Failover { .. } | Request::FailoverCleanup { .. } => on_the_target("failover"),
        Request::Reprotect { .. } => on_the_target("reprotect"),
        Request::Failback { .. } => on_the_target("failback"),
        // The event loop runs verify itself (it needs the shipper and takes a while).
        Request::Verify { .. } => error("verify needs the replication components"),
    }
}

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

fn on_the_target(what: &str) -> Response {
    error(format!(
        "{what} runs on the target appliance (the one with a [target] section, which holds the replicas and recovery points); this appliance has none"
    ))
}

/// The disks a selector names (neither field: every disk), or why it names none.
pub(crate) fn select<'a>(
    status: &'a StatusModel,
    selector: &DiskSelector,
) -> Result<Vec<&'a Arc<DiskStats>>, String> {
    if status.disks().is_empty() {
        return Err("this appliance protects no disks (it has no [source] machines)".to_string());
    }
    match (&selector.disk, &selector.group) {
        (Some(_), Some(_)) => Err("give a disk or a group, not both".to_string()),
        (Some(label), None) => status
            .disk_by_label(label)
            .map(|disk| vec![disk])
            .ok_or_else(|| {
                let known: Vec<String> = status.disks().iter().map(|disk| disk.label()).collect();
                format!("no disk {label:?} (disks: {})", known.join(", "))
            }),
        (None, Some(group)) => {
            let disks: Vec<_> = status
                .disks()
                .iter()
                .filter(|disk| &disk.group == group)
                .collect();
            if disks.is_empty() {
                Err(format!("no group {group:?} with disks on this appliance"))
            } else {
                Ok(disks)
            }
        }
        (None, None) => Ok(status.disks().iter().collect()),
    }
}

fn set_paused(status: &StatusModel, selector: &DiskSelector, paused: bool) -> Response {
    let disks = match select(status, selector) {
        Ok(disks) => disks,
        Err(message) => return error(message),
    };
    let verb = if paused { "paused" } else { "resumed" };
    let labels: Vec<String> = disks.iter().map(|disk| disk.label()).collect();
    for disk in &disks {
        disk.set_paused(paused);
    }
    tracing::info!(disks = %labels.join(","), "replication {verb} by operator");
    Response::Ok {
        message: format!("{verb} {}", labels.join(", ")),
    }
}

fn set_bandwidth(config: &Config, status: &StatusModel, bytes_per_s: Option<u64>) -> Response {
    if config.source.is_none() {
        return error("this appliance has no [source]: there is no outgoing link to limit");
    }
    if bytes_per_s == Some(0) {
        return error("a bandwidth limit must be above 0 bytes/s (send none to remove the limit)");
    }
    status.set_bandwidth_limit_bytes_per_s(bytes_per_s);
    let message = match bytes_per_s {
        Some(limit) => format!("bandwidth limit set to {limit} bytes/s"),
        None => "bandwidth limit removed".to_string(),
    };
    tracing::info!("{message} by operator");
    Response::Ok { message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::DiskState;

    fn config() -> Config {
        Config::parse(
            r#"
[appliance]
name = "a"
state_dir = "/s"
[source]
journal_size = "64MiB"
target = "127.0.0.1:7400"
[[source.group]]
name = "g1"
[[source.group]]
name = "g2"
[[source.machine]]
name = "m1"
group = "g1"
disks = [{ name = "os", path = "/m1os", export = "/m1os.sock" }, { name = "data", path = "/m1d", export = "/m1d.sock" }]
[[source.machine]]
name = "m2"
group = "g2"
disks = [{ name = "os", path = "/m2os", export = "/m2os.sock" }]
"#,
        )
        .unwrap()
    }

    fn paused(status: &StatusModel) -> Vec<bool> {
        status.disks().iter().map(|disk| disk.is_paused()).collect()
    }

    fn disk(label: &str) -> DiskSelector {
        DiskSelector {
            disk: Some(label.into()),
            group: None,
        }
    }

    fn group(group: &str) -> DiskSelector {
        DiskSelector {
            disk: None,
            group: Some(group.into()),
        }
    }

    #[test]
    fn pause_and_resume_by_disk_group_and_all() {
        let config = config();
        let status = StatusModel::from_config(&config);
        let response = dispatch(
            &config,
            &status,
            Request::Pause {
                selector: disk("m1/data"),
            },
        );
        assert_eq!(
            response,
            Response::Ok {
                message: "paused m1/data".into()
            }
        );
        assert_eq!(paused(&status), [false, true, false]);
        assert_eq!(status.snapshot_now().disks[1].state, DiskState::Paused);

        dispatch(
            &config,
            &status,
            Request::Pause {
                selector: group("g2"),
            },
        );
        assert_eq!(paused(&status), [false, true, true]);
        dispatch(
            &config,
            &status,
            Request::Resume {
                selector: group("g1"),
            },
        );
        assert_eq!(paused(&status), [false, false, true]);
        dispatch(
            &config,
            &status,
            Request::Pause {
                selector: DiskSelector::default(),
            },
        );
        assert_eq!(paused(&status), [true, true, true]);
        dispatch(
            &config,
            &status,
            Request::Resume {
                selector: DiskSelector::default(),
            },
        );
        assert_eq!(paused(&status), [false, false, false]);
    }

    #[test]
    fn bad_selectors_are_refused_and_change_nothing() {
        let config = config();
        let status = StatusModel::from_config(&config);
        let both = DiskSelector {
            disk: Some("m1/os".into()),
            group: Some("g1".into()),
        };
        for selector in [
            disk("m9/os"),
            disk("m1"),
            disk("m1/nope"),
            group("nope"),
            both,
        ] {
            let response = dispatch(
                &config,
                &status,
                Request::Pause {
                    selector: selector.clone(),
                },
            );
            assert!(
                matches!(response, Response::Error { .. }),
                "{selector:?}: {response:?}"
            );
        }
        assert_eq!(paused(&status), [false, false, false]);
    }

    #[test]
    fn commands_of_later_stages_answer_an_error() {
        let config = config();
        let status = StatusModel::from_config(&config);
        let request = Request::CreateRecoveryPoint {
            group: "g1".into(),
            app_consistent: false,
        };
        assert!(matches!(
            dispatch(&config, &status, request),
            Response::Error { .. }
        ));
    }

    #[test]
    fn bandwidth_limit_is_set_and_removed() {
        let config = config();
        let status = StatusModel::from_config(&config);
        let response = dispatch(
            &config,
            &status,
            Request::SetBandwidth {
                bytes_per_s: Some(1 << 20),
            },
        );
        assert!(matches!(response, Response::Ok { .. }));
        assert_eq!(status.bandwidth_limit_bytes_per_s(), Some(1 << 20));
        assert_eq!(
            status
                .snapshot_now()
                .link
                .unwrap()
                .bandwidth_limit_bytes_per_s,
            Some(1 << 20)
        );
        let response = dispatch(
            &config,
            &status,
            Request::SetBandwidth {
                bytes_per_s: Some(0),
            },
        );
        assert!(matches!(response, Response::Error { .. }));
        assert_eq!(status.bandwidth_limit_bytes_per_s(), Some(1 << 20));
        dispatch(
            &config,
            &status,
            Request::SetBandwidth { bytes_per_s: None },
        );
        assert_eq!(status.bandwidth_limit_bytes_per_s(), None);
    }
}
