//! Connection census: the sum of `kefu_connections` over a cluster's ready pods, read from each pod's
//! `/metrics` at reconcile time and shown as `status.connections` (and the `Connections` printer column).
//! A pod that does not answer within a second is left out; no pod answering gives no figure at all.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::Result;
use crate::scaling::CONNECTIONS_METRIC;

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest /metrics body read from a pod.
const MAX_BODY: u64 = 4 * 1024 * 1024;

/// Sum of every `kefu_connections{...} N` sample in a Prometheus text exposition.
pub fn parse_connections(text: &str) -> Option<i64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(CONNECTIONS_METRIC) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue; // another metric with this prefix
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *total.get_or_insert(0) += v as i64;
        }
    }
    total
}

async fn scrape(addr: SocketAddr) -> Option<i64> {
    let fetch = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: kefu\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut body = String::new();
        s.take(MAX_BODY).read_to_string(&mut body).await.ok()?;
        body.starts_with("HTTP/1.1 200").then_some(body)
    };
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, fetch).await.ok()??;
    Some(parse_connections(&body).unwrap_or(0))
}

fn ready_ip(pod: &Pod) -> Option<IpAddr> {
    let status = pod.status.as_ref()?;
    let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return None;
    }
    status.pod_ip.as_deref()?.parse().ok()
}

/// Connections of the pods matching `selector` in `pods`' namespace, scraped on `port`.
pub async fn count(pods: &Api<Pod>, selector: &str, port: u16) -> Result<Option<i64>> {
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    let scrapes = list.items.iter().filter_map(ready_ip).map(|ip| scrape(SocketAddr::new(ip, port)));
    let counts = futures_util::future::join_all(scrapes).await;
    Ok(counts.into_iter().flatten().reduce(|a, b| a + b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_role_and_ignores_other_metrics() {
        let text = "# HELP kefu_connections Open client connections\n# TYPE kefu_connections gauge\n\
                    kefu_connections{role=\"agent\"} 3\nkefu_connections{role=\"visitor\"} 40\n\
                    kefu_connections_total 99\nkefu_frames_in_total 7\n";
        assert_eq!(parse_connections(text), Some(43));
        assert_eq!(parse_connections("kefu_frames_in_total 7\n"), None);
    }
}
