//! From staged writes to clients: group-committed batches become durable in order, then their effects
//! (acks, fan-out, summaries, offline inbox) are released in that order.

use super::*;

impl Engine {
    pub(super) fn meta_op(&mut self, conv: &str) -> Op {
        self.dirty_meta.remove(conv);
        let json = self.convs.get(conv).map(|c| encode(&c.meta)).unwrap_or_default();
        Op::Conversation { id: conv.to_owned(), json }
    }

    pub(super) fn commit(&mut self, ops: Vec<Op>, effects: Vec<Effect>, at: Instant) {
        let token = self.next_token;
        self.next_token += 1;
        if let Err(e) = self.writer.submit(Batch { ops, done: Done::Token(token) }) {
            tracing::error!(error = %e, "store writer gone");
            self.healthy = false;
            return;
        }
        self.pending.push_back((token, Pending { effects, at, submitted: Instant::now() }));
    }

    pub(super) fn on_durable(&mut self, ev: DurableEvent) {
        let tokens = match ev {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "store failed: refusing writes until restart");
                self.healthy = false;
                return;
            }
        };
        for token in tokens {
            // Batches become durable in submission order.
            let Some((t, pending)) = self.pending.pop_front() else { break };
            debug_assert_eq!(t, token);
            self.stage_durable_wait.observe(pending.submitted.elapsed().as_secs_f64());
            for effect in pending.effects {
                self.release(effect, pending.at);
            }
        }
    }

    pub(super) fn release(&mut self, effect: Effect, at: Instant) {
        match effect {
            Effect::Entry { conv, entry, ack } => {
                self.metrics.entries.inc();
                let Some(c) = self.convs.get_mut(&conv) else { return };
                c.durable_seq = c.durable_seq.max(entry.seq);
                c.recent.push_back(entry.clone());
                while c.recent.len() > RECENT {
                    c.recent.pop_front();
                }
                let waiters = c.waiters.remove(&entry.seq).unwrap_or_default();
                let ack_conn = ack.as_ref().map(|(conn, _)| *conn);
                if let Some((conn, id)) = ack {
                    let seq = Some(entry.seq);
                    self.push(conn, &ServerFrame::Ack { id, conv: Some(conv.clone()), seq, duplicate: false });
                }
                for (conn, id) in waiters {
                    let seq = Some(entry.seq);
                    self.push(conn, &ServerFrame::Ack { id, conv: Some(conv.clone()), seq, duplicate: true });
                }
                self.fan_out(&conv, &entry, ack_conn);
                self.metrics.delivery_latency.observe(at.elapsed().as_secs_f64());
            }
            Effect::Frame { conn, out } => self.push_out(conn, out),
            Effect::Summary { conv, extra } => {
                let Some(summary) = self.summary(&conv) else { return };
                let out: Out = Arc::from(ServerFrame::Conversation { conv: summary }.to_json());
                let mut targets = self.participant_conns(&conv);
                targets.extend(extra);
                targets.sort_unstable();
                targets.dedup();
                for t in targets {
                    self.push_out(t, out.clone());
                }
            }
            Effect::Position { conv } => self.send_position(&conv, true),
            Effect::Reply(tx) => {
                let _ = tx.send(Ok(()));
            }
        }
    }

    /// Connections of the visitor, the assigned agent and watchers.
    pub(super) fn participant_conns(&self, conv: &str) -> Vec<ConnId> {
        let Some(c) = self.convs.get(conv) else { return Vec::new() };
        let mut out: Vec<ConnId> = Vec::new();
        if let Some(v) = self.visitors.get(&c.meta.visitor) {
            out.extend(&v.conns);
        }
        if let Some(a) = c.meta.agent.as_ref().and_then(|a| self.agents.get(a)) {
            out.extend(&a.conns);
        }
        out.extend(c.watchers.iter());
        out
    }

    pub(super) fn fan_out(&mut self, conv: &str, entry: &Arc<Entry>, skip: Option<ConnId>) {
        let Some(c) = self.convs.get(conv) else { return };
        let out: Out = Arc::from(ServerFrame::Msg { conv: conv.to_owned(), entry: (**entry).clone() }.to_json());
        let author = entry.from.key();
        let mut offline: Vec<String> = Vec::new();
        let visitor_key = format!("visitor:{}", c.meta.visitor);
        match self.visitors.get(&c.meta.visitor) {
            Some(v) if !v.conns.is_empty() => {}
            _ if author != visitor_key => offline.push(visitor_key),
            _ => {}
        }
        if let Some(agent) = &c.meta.agent {
            let agent_key = format!("agent:{agent}");
            let connected = self.agents.get(agent).is_some_and(|a| !a.conns.is_empty());
            if !connected && author != agent_key {
                offline.push(agent_key);
            }
        }
        for t in self.participant_conns(conv) {
            if Some(t) != skip {
                self.push_out(t, out.clone());
            }
        }
        if let Some(inbox) = &self.inbox {
            for recipient in offline {
                self.metrics.offline_entries.inc();
                let _ = inbox.send(InboxCmd::Put { recipient, items: vec![(conv.to_owned(), (**entry).clone())] });
            }
        }
    }
}
