//! Offering queued conversations to agents (longest waiting first), offer expiry, queue positions, and the
//! periodic tick (typing trailing edges, cursor persistence, memory trimming).

use super::*;

impl Engine {
    /// Offer queued conversations to agents, longest waiting first, until nobody has room.
    pub(super) fn dispatch(&mut self) {
        if self.shutting_down {
            return;
        }
        let params = router::Params {
            strategy: self.cfg.routing.strategy,
            load_threshold: self.cfg.routing.load_threshold,
            virtual_nodes: self.cfg.routing.virtual_nodes,
        };
        let waiting: Vec<String> = self.queue.iter().map(|(_, c)| c.clone()).collect();
        for conv in waiting {
            if !self.agents.values().any(|a| a.available() && a.load() < a.agent.capacity) {
                break;
            }
            let Some(c) = self.convs.get(&conv) else { continue };
            if c.offer.is_some() || c.meta.state != ConvState::Queued {
                continue;
            }
            let choice = {
                let candidates: Vec<Candidate<'_>> = self
                    .agents
                    .values()
                    .map(|a| Candidate {
                        id: &a.agent.id,
                        skills: &a.agent.skills,
                        capacity: a.agent.capacity,
                        load: a.load(),
                        available: a.available(),
                    })
                    .collect();
                let req = router::Request { key: &c.meta.visitor, skills: &c.meta.skills, exclude: &c.declined };
                let mut pick = self.router.choose(params, &req, &candidates).map(str::to_owned);
                if pick.is_none() && !c.declined.is_empty() {
                    // Everyone with room declined: start another round rather than strand the visitor.
                    let req = router::Request { key: &c.meta.visitor, skills: &c.meta.skills, exclude: &[] };
                    pick = self.router.choose(params, &req, &candidates).map(str::to_owned);
                }
                pick
            };
            let Some(agent) = choice else { continue };
            if let Some(a) = self.agents.get_mut(&agent) {
                a.offered.insert(conv.clone());
            }
            if self.cfg.routing.auto_accept {
                let fid = new_id("e");
                let via = strategy_name(self.cfg.routing.strategy);
                self.assign(&conv, &agent, &fid, None, via, Instant::now());
                continue;
            }
            let expires = Instant::now() + Duration::from_secs(self.cfg.routing.offer_timeout_secs);
            if let Some(c) = self.convs.get_mut(&conv) {
                c.offer = Some(Offer { agent: agent.clone(), expires });
                self.offer_deadlines.insert((expires, conv.clone()));
            }
            if let Some(frame) = self.offer_frame(&conv) {
                let out: Out = Arc::from(frame.to_json());
                let conns = self.agents.get(&agent).map(|a| a.conns.clone()).unwrap_or_default();
                for t in conns {
                    self.push_out(t, out.clone());
                }
            }
        }
    }

    pub(super) fn offer_frame(&self, conv: &str) -> Option<ServerFrame> {
        let c = self.convs.get(conv)?;
        let offer = c.offer.as_ref()?;
        let expires_in_ms = offer.expires.saturating_duration_since(Instant::now()).as_millis() as u64;
        Some(ServerFrame::Offer { conv: self.summary(conv)?, expires_in_ms })
    }

    pub(super) fn send_positions(&mut self) {
        let waiting: Vec<String> = self.queue.iter().map(|(_, c)| c.clone()).collect();
        for conv in waiting {
            self.send_position(&conv, false);
        }
    }

    /// Tell the visitor their queue position when it changed (or always, when `force`).
    pub(super) fn send_position(&mut self, conv: &str, force: bool) {
        let Some(position) = self.queue.iter().position(|(_, c)| c == conv).map(|p| p + 1) else { return };
        let waiting = self.queue.len();
        let Some(c) = self.convs.get_mut(conv) else { return };
        if !force && c.last_position == Some(position) {
            return;
        }
        c.last_position = Some(position);
        let visitor = c.meta.visitor.clone();
        // A rough estimate: recent average wait per position ahead. Absent until someone was assigned.
        let estimated_wait_ms = self.wait_ema_ms.map(|e| (e * position as f64) as u64);
        let frame = ServerFrame::Queue { conv: conv.to_owned(), position, waiting, estimated_wait_ms };
        let out: Out = Arc::from(frame.to_json());
        let conns = self.visitors.get(&visitor).map(|v| v.conns.clone()).unwrap_or_default();
        for t in conns {
            self.push_out(t, out.clone());
        }
    }

    /// Every 100 ms: expired offers, trailing typing edges, queued conversations, dirty metadata, and now
    /// and then the sweep of closed conversations. Touches only conversations with something due, so its
    /// cost does not grow with the number of open conversations.
    pub(super) fn on_tick(&mut self) {
        let now = Instant::now();
        self.ticks += 1;
        // Offers not accepted in time go to someone else.
        let mut expired = Vec::new();
        while let Some(first) = self.offer_deadlines.first() {
            if first.0 > now {
                break;
            }
            let Some((deadline, conv)) = self.offer_deadlines.pop_first() else { break };
            let current = self.convs.get(&conv).and_then(|c| c.offer.as_ref()).is_some_and(|o| o.expires == deadline);
            if current {
                expired.push(conv);
            }
        }
        for conv in &expired {
            tracing::info!(conv = %conv, "offer expired; re-offering");
            self.withdraw_offer(conv, true);
        }
        // Trailing edge of coalesced typing indicators.
        if !self.typing_due.is_empty() {
            let interval = Duration::from_millis(self.cfg.typing.interval_ms);
            let mut due: Vec<(String, Vec<(Participant, bool)>)> = Vec::new();
            let convs = &mut self.convs;
            self.typing_due.retain(|id| {
                let Some(c) = convs.get_mut(id) else { return false };
                if c.typing.pending.is_empty() {
                    return false;
                }
                if c.typing.last_forward.is_some_and(|t| now.duration_since(t) < interval) {
                    return true;
                }
                c.typing.last_forward = Some(now);
                due.push((id.clone(), c.typing.pending.drain().map(|(_, v)| v).collect()));
                false
            });
            for (conv, items) in due {
                for (from, on) in items {
                    self.forward_typing(&conv, &from, on);
                }
            }
        }
        if !expired.is_empty() || !self.queue.is_empty() {
            self.dispatch();
        }
        self.persist_dirty();
        if self.ticks.is_multiple_of(10) {
            self.update_open_gauge();
        }
        // Closed conversations nobody is looking at leave memory (they stay in the store); every 5 s.
        if self.ticks.is_multiple_of(50) && self.convs.len() > 1024 {
            let idle: Vec<String> = self
                .convs
                .iter()
                .filter(|(_, c)| {
                    c.meta.state == ConvState::Closed && c.durable_seq == c.next_seq && c.watchers.is_empty()
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in idle {
                if !self.dirty_meta.contains(&id) {
                    self.convs.remove(&id);
                }
            }
        }
    }

    pub(super) fn persist_dirty(&mut self) {
        if self.dirty_meta.is_empty() {
            return;
        }
        let ids: Vec<String> = self.dirty_meta.iter().cloned().collect();
        let ops: Vec<Op> = ids.iter().map(|id| self.meta_op(id)).collect();
        self.commit(ops, Vec::new(), Instant::now());
    }
}
