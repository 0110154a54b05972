//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator replicas are safe: only the
//! holder runs the controller. The holder renews every `duration / 3`; a standby takes over once a lease
//! has not been renewed for `duration`. Writes carry the Lease's resourceVersion, so two contenders cannot
//! both win (the loser gets 409 Conflict).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

use crate::error::Result;

/// One contender for a named Lease.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    /// Contend for `name` in `api`'s namespace as `identity` (usually the pod name).
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> LeaseLock {
        LeaseLock { api, name: name.into(), identity: identity.into(), duration }
    }

    /// How often the holder renews.
    pub fn renew_interval(&self) -> Duration {
        self.duration / 3
    }

    /// Take the lease if free or expired, or renew it if held. `Ok(true)`: this contender holds it now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        self.try_at(Timestamp::now()).await
    }

    async fn try_at(&self, now: Timestamp) -> Result<bool> {
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let held_by_us = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let ttl = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(secs)));
        let expired = spec.renew_time.as_ref().is_none_or(|t| t.0 + ttl < now);
        if !held_by_us && !expired {
            return Ok(false);
        }
        if !held_by_us {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::FakeApi;

    #[tokio::test]
    async fn only_one_of_two_contenders_leads_until_the_lease_expires() {
        let fake = FakeApi::start();
        let api = |c: &kube::Client| Api::<Lease>::namespaced(c.clone(), "kefu-system");
        let a = LeaseLock::new(api(&fake.client), "kefu-operator", "a", Duration::from_secs(15));
        let b = LeaseLock::new(api(&fake.client), "kefu-operator", "b", Duration::from_secs(15));
        let t0 = Timestamp::from_second(1_000_000).unwrap();
        assert!(a.try_at(t0).await.unwrap(), "first contender creates the lease");
        assert!(!b.try_at(t0 + SignedDuration::from_secs(5)).await.unwrap(), "held and fresh");
        assert!(a.try_at(t0 + SignedDuration::from_secs(10)).await.unwrap(), "holder renews");
        assert!(!b.try_at(t0 + SignedDuration::from_secs(20)).await.unwrap(), "renewed at 10 s, valid to 25 s");
        assert!(b.try_at(t0 + SignedDuration::from_secs(26)).await.unwrap(), "expired: b takes over");
        assert!(!a.try_at(t0 + SignedDuration::from_secs(27)).await.unwrap(), "a is now the standby");
        let lease = fake.object("/apis/coordination.k8s.io/v1/namespaces/kefu-system/leases/kefu-operator").unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
    }

    #[tokio::test]
    async fn stale_write_loses_with_conflict() {
        let fake = FakeApi::start();
        let api = Api::<Lease>::namespaced(fake.client.clone(), "kefu-system");
        let a = LeaseLock::new(api.clone(), "l", "a", Duration::from_secs(15));
        let t0 = Timestamp::from_second(1_000_000).unwrap();
        assert!(a.try_at(t0).await.unwrap());
        // Someone else renews between our read and our write: the resourceVersion no longer matches.
        let mut stale = api.get("l").await.unwrap();
        assert!(a.try_at(t0 + SignedDuration::from_secs(1)).await.unwrap());
        stale.spec.as_mut().unwrap().holder_identity = Some("intruder".into());
        let err = api.replace("l", &PostParams::default(), &stale).await.unwrap_err();
        assert!(matches!(err, kube::Error::Api(s) if s.code == 409));
    }
}
