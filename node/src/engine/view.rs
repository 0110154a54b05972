//! Read-only views of engine state (summaries, agent lists) and agent registration.

use super::*;

impl Engine {
    pub(super) fn put_agent(&mut self, agent: Agent, reply: oneshot::Sender<Result<(), ErrorCode>>) {
        let ops = vec![Op::Agent { id: agent.id.clone(), json: encode(&agent) }];
        match self.agents.get_mut(&agent.id) {
            Some(a) => a.agent = agent,
            None => {
                self.agents.insert(agent.id.clone(), AgentRt::new(agent));
            }
        }
        self.commit(ops, vec![Effect::Reply(reply)], Instant::now());
        self.dispatch();
    }

    pub(super) fn agent_views(&self) -> Vec<AgentView> {
        let mut v: Vec<AgentView> = self
            .agents
            .values()
            .map(|a| AgentView {
                id: a.agent.id.clone(),
                name: a.agent.name.clone(),
                skills: a.agent.skills.clone(),
                capacity: a.agent.capacity,
                admin: a.agent.admin,
                status: a.status,
                connections: a.conns.len(),
                assigned: a.assigned.iter().cloned().collect(),
                offered: a.offered.iter().cloned().collect(),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub(super) fn participant(&self, key: &str) -> Participant {
        match split_key(key) {
            ("visitor", id) => Participant::visitor(id, self.visitors.get(id).and_then(|v| v.name.as_deref())),
            (_, id) => Participant::agent(id, self.agents.get(id).map_or(id, |a| a.agent.name.as_str())),
        }
    }

    pub(super) fn summary(&self, conv: &str) -> Option<ConversationSummary> {
        let c = self.convs.get(conv)?;
        Some(ConversationSummary {
            id: c.meta.id.clone(),
            state: c.meta.state,
            visitor: c.meta.visitor.clone(),
            visitor_name: c.meta.visitor_name.clone(),
            agent: c.meta.agent.clone(),
            agent_name: c.meta.agent.as_ref().and_then(|a| self.agents.get(a)).map(|a| a.agent.name.clone()),
            skills: c.meta.skills.clone(),
            last_seq: c.durable_seq,
            created_ms: c.meta.created_ms,
            queued_ms: c.meta.queued_ms,
            rating: c.meta.rating.clone(),
            cursors: c.meta.cursors.clone(),
        })
    }

    pub(super) fn summaries_for(&self, key: &str) -> Vec<ConversationSummary> {
        let ids: Vec<String> = match split_key(key) {
            ("visitor", id) => self.visitors.get(id).map(|v| v.open.iter().cloned().collect()).unwrap_or_default(),
            (_, id) => self.agents.get(id).map(|a| a.assigned.iter().cloned().collect()).unwrap_or_default(),
        };
        ids.iter().filter_map(|c| self.summary(c)).filter(|s| s.last_seq > 0).collect()
    }

    /// The queue gauge, after every change. The open-conversations count walks every conversation, so it
    /// is refreshed once a second by the tick (and at start-up), not per event.
    pub(super) fn update_gauges(&self) {
        self.metrics.queued.set(self.queue.len() as i64);
    }

    pub(super) fn update_open_gauge(&self) {
        self.metrics
            .open_conversations
            .set(self.convs.values().filter(|c| c.meta.state != ConvState::Closed).count() as i64);
    }
}
