//! Status conditions Ready / Progressing / Degraded, computed from the StatefulSet and from what reconcile
//! could not do. `lastTransitionTime` only moves when a condition's status flips, and each flip is reported
//! so the controller can publish an Event for it.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kefu_crds::KefuClusterSpec;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// Something reconcile could not do, shown as `Degraded=True`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase reason, from a fixed set.
    pub reason: &'static str,
    pub message: String,
}

/// A condition whose status flipped (or appeared) in this reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

fn cond(type_: &str, ok: bool, reason: &str, message: String, generation: Option<i64>, now: &Time) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// The conditions that describe `sts` running `spec` right now (transition times all `now`; see [`merge`]).
pub fn compute(
    spec: &KefuClusterSpec,
    generation: Option<i64>,
    sts: Option<&StatefulSet>,
    problem: Option<&Problem>,
    now: &Time,
) -> Vec<Condition> {
    let desired = spec.effective_replicas();
    let st = sts.and_then(|s| s.status.as_ref());
    let ready = st.and_then(|s| s.ready_replicas).unwrap_or(0);
    let running = st.map_or(0, |s| s.replicas);
    let updated = st.and_then(|s| s.updated_replicas).unwrap_or(0);
    let sts_generation = sts.and_then(|s| s.metadata.generation);
    let observed = st.and_then(|s| s.observed_generation);
    let rolled = st.is_some_and(|s| s.update_revision.is_none() || s.current_revision == s.update_revision);
    let settled = sts.is_some() && observed >= sts_generation && running == desired && updated >= desired && rolled;

    let (ready_ok, ready_reason, ready_msg) = if spec.stopped {
        (false, "Stopped", "spec.stopped is set: no pods run".to_owned())
    } else if sts.is_none() {
        (false, "Creating", "the StatefulSet does not exist yet".to_owned())
    } else if ready >= desired && desired > 0 {
        (true, "AllReplicasReady", format!("{ready}/{desired} pods ready"))
    } else if desired == 0 {
        (false, "ScaledToZero", "spec.replicas is 0".to_owned())
    } else {
        (false, "ReplicasNotReady", format!("{ready}/{desired} pods ready"))
    };

    let (prog_ok, prog_reason, prog_msg) = if spec.paused {
        (false, "Paused", "spec.paused is set: children are not updated".to_owned())
    } else if settled && ready >= desired {
        (false, "Stable", format!("{desired} pods at the current revision"))
    } else if running != desired {
        (true, "Scaling", format!("{running} pods running, {desired} desired"))
    } else {
        (true, "RollingUpdate", format!("{updated}/{desired} pods updated, {ready} ready"))
    };

    let (deg_ok, deg_reason, deg_msg) = match problem {
        Some(p) => (true, p.reason, p.message.clone()),
        None => (false, "AsExpected", "all children applied".to_owned()),
    };

    vec![
        cond(READY, ready_ok, ready_reason, ready_msg, generation, now),
        cond(PROGRESSING, prog_ok, prog_reason, prog_msg, generation, now),
        cond(DEGRADED, deg_ok, deg_reason, deg_msg, generation, now),
    ]
}

/// Merge freshly computed conditions into the old ones: a condition whose status did not change keeps its
/// old `lastTransitionTime` (reason and message still update). Returns the merged list and the flips.
pub fn merge(old: &[Condition], new: Vec<Condition>) -> (Vec<Condition>, Vec<Transition>) {
    let mut flips = Vec::new();
    let merged = new
        .into_iter()
        .map(|mut c| {
            match old.iter().find(|o| o.type_ == c.type_) {
                Some(o) if o.status == c.status => c.last_transition_time = o.last_transition_time.clone(),
                _ => flips.push(Transition {
                    type_: c.type_.clone(),
                    status: c.status.clone(),
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                }),
            }
            c
        })
        .collect();
    (merged, flips)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn spec(v: serde_json::Value) -> KefuClusterSpec {
        serde_json::from_value(v).unwrap()
    }

    fn sts(replicas: i32, ready: i32, updated: i32, rev: (&str, &str)) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta { generation: Some(2), ..ObjectMeta::default() },
            spec: Some(StatefulSetSpec { replicas: Some(replicas), ..StatefulSetSpec::default() }),
            status: Some(StatefulSetStatus {
                replicas,
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                observed_generation: Some(2),
                current_revision: Some(rev.0.into()),
                update_revision: Some(rev.1.into()),
                ..StatefulSetStatus::default()
            }),
        }
    }

    fn status_of<'a>(cs: &'a [Condition], type_: &str) -> (&'a str, &'a str) {
        let c = cs.iter().find(|c| c.type_ == type_).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn all_pods_ready_at_current_revision_is_ready_and_stable() {
        let cs =
            compute(&spec(serde_json::json!({"replicas": 3})), Some(4), Some(&sts(3, 3, 3, ("a", "a"))), None, &t(1));
        assert_eq!(status_of(&cs, READY), ("True", "AllReplicasReady"));
        assert_eq!(status_of(&cs, PROGRESSING), ("False", "Stable"));
        assert_eq!(status_of(&cs, DEGRADED), ("False", "AsExpected"));
        assert!(cs.iter().all(|c| c.observed_generation == Some(4)));
    }

    #[test]
    fn rolling_update_and_scaling_are_progressing() {
        let s = spec(serde_json::json!({"replicas": 3}));
        let cs = compute(&s, None, Some(&sts(3, 2, 1, ("a", "b"))), None, &t(1));
        assert_eq!(status_of(&cs, READY), ("False", "ReplicasNotReady"));
        assert_eq!(status_of(&cs, PROGRESSING), ("True", "RollingUpdate"));
        let cs = compute(&s, None, Some(&sts(2, 2, 2, ("a", "a"))), None, &t(1));
        assert_eq!(status_of(&cs, PROGRESSING), ("True", "Scaling"));
        let cs = compute(&s, None, None, None, &t(1));
        assert_eq!(status_of(&cs, READY), ("False", "Creating"));
    }

    #[test]
    fn stopped_paused_and_problems_are_reported() {
        let cs =
            compute(&spec(serde_json::json!({"stopped": true})), None, Some(&sts(0, 0, 0, ("a", "a"))), None, &t(1));
        assert_eq!(status_of(&cs, READY), ("False", "Stopped"));
        let cs =
            compute(&spec(serde_json::json!({"paused": true})), None, Some(&sts(1, 1, 1, ("a", "a"))), None, &t(1));
        assert_eq!(status_of(&cs, PROGRESSING), ("False", "Paused"));
        let p = Problem { reason: "InvalidSpec", message: "spec.config.data.dir is set by the operator".into() };
        let cs = compute(&spec(serde_json::json!({})), None, None, Some(&p), &t(1));
        assert_eq!(status_of(&cs, DEGRADED), ("True", "InvalidSpec"));
    }

    #[test]
    fn transition_time_only_changes_when_status_flips() {
        let s = spec(serde_json::json!({"replicas": 2}));
        let first = compute(&s, None, Some(&sts(2, 1, 2, ("a", "a"))), None, &t(100));
        let (c1, flips) = merge(&[], first);
        assert_eq!(flips.len(), 3, "every condition appears once");
        // Same statuses, new message (1 → still 1 ready, but later): times stay.
        let again = compute(&s, None, Some(&sts(2, 1, 2, ("a", "a"))), None, &t(200));
        let (c2, flips) = merge(&c1, again);
        assert!(flips.is_empty());
        assert!(c2.iter().all(|c| c.last_transition_time == t(100)));
        // Ready flips to True: only Ready (and Progressing, now Stable) move.
        let ready = compute(&s, None, Some(&sts(2, 2, 2, ("a", "a"))), None, &t(300));
        let (c3, flips) = merge(&c2, ready);
        let flipped: Vec<&str> = flips.iter().map(|f| f.type_.as_str()).collect();
        assert_eq!(flipped, [READY, PROGRESSING]);
        assert_eq!(c3.iter().find(|c| c.type_ == READY).unwrap().last_transition_time, t(300));
        assert_eq!(c3.iter().find(|c| c.type_ == DEGRADED).unwrap().last_transition_time, t(100));
    }
}
