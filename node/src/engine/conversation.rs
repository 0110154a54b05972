//! Frames that act on a conversation: open, send, typing, read, resume, accept, transfer, close, rate, presence, watch.
//! Each applies its change in memory and stages writes and effects; `delivery` releases them once durable.

use super::*;

impl Engine {
    pub(super) fn open(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        skills: Vec<String>,
        name: Option<String>,
        at: Instant,
    ) -> Result<(), (ErrorCode, String)> {
        check_id(fid)?;
        let (_, vid) = split_key(key);
        let vid = vid.to_owned();
        if skills.len() > 8 || skills.iter().any(|s| s.is_empty() || s.len() > 32) {
            return Err((ErrorCode::Invalid, "skills: at most 8 tags of 1..=32 characters".into()));
        }
        if name.as_ref().is_some_and(|n| n.chars().count() > 64) {
            return Err((ErrorCode::Invalid, "name: at most 64 characters".into()));
        }
        if let Some(existing) = self.visitors.get(&vid).and_then(|v| v.open.iter().next().cloned()) {
            let durable = self.convs.get(&existing).is_some_and(|c| c.durable_seq > 0);
            if durable {
                self.push(
                    conn,
                    &ServerFrame::Ack { id: fid.to_owned(), conv: Some(existing.clone()), seq: None, duplicate: true },
                );
                if let Some(s) = self.summary(&existing) {
                    self.push(conn, &ServerFrame::Conversation { conv: s });
                }
            } else if let Some(c) = self.convs.get_mut(&existing) {
                // The open is still being committed: answer when it is.
                c.waiters.entry(1).or_default().push((conn, fid.to_owned()));
            }
            return Ok(());
        }
        let now = now_ms();
        let id = new_id("c");
        if let Owner::Remote(node) = self.ownership.owner_of(&id) {
            return Err((ErrorCode::NotOwner, format!("conversation would be owned by node {node}")));
        }
        let visitor_name = name.or_else(|| self.visitors.get(&vid).and_then(|v| v.name.clone()));
        let meta = Conversation {
            id: id.clone(),
            visitor: vid.clone(),
            visitor_name,
            state: ConvState::Queued,
            agent: None,
            skills: skills.clone(),
            tags: Vec::new(),
            rating: None,
            created_ms: now,
            queued_ms: Some(now),
            assigned_ms: None,
            first_response_ms: None,
            closed_ms: None,
            cursors: Default::default(),
        };
        self.convs.insert(id.clone(), new_rt(meta, 0));
        self.visitors.entry(vid.clone()).or_default().open.insert(id.clone());
        self.queue.insert((now, id.clone()));
        let from = self.participant(key);
        let mut ops = Vec::new();
        let mut effects = Vec::new();
        self.append(
            &id,
            fid,
            from,
            Body::Event { event: Event::Opened { skills } },
            Some(conn),
            &mut ops,
            &mut effects,
        );
        ops.push(self.meta_op(&id));
        effects.push(Effect::Summary { conv: id.clone(), extra: vec![] });
        effects.push(Effect::Position { conv: id.clone() });
        self.commit(ops, effects, at);
        self.update_gauges();
        self.dispatch();
        Ok(())
    }

    pub(super) fn send_message(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        conv: &str,
        text: &str,
        at: Instant,
    ) -> Result<(), (ErrorCode, String)> {
        if self.retried(conn, key, fid, conv)? {
            return Ok(());
        }
        let c = self.convs.get(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        if !self.is_participant(key, c) {
            return Err((ErrorCode::Forbidden, "you are not a participant of this conversation".into()));
        }
        if c.meta.state == ConvState::Closed {
            return Err((ErrorCode::Conflict, "conversation is closed".into()));
        }
        if text.trim().is_empty() {
            return Err((ErrorCode::Invalid, "text must not be empty".into()));
        }
        if text.chars().count() > self.cfg.limits.max_text_chars {
            return Err((ErrorCode::Invalid, format!("text exceeds {} characters", self.cfg.limits.max_text_chars)));
        }
        let text = match self.filter.check(text) {
            Verdict::Clean => text.to_owned(),
            Verdict::Masked(t) => t,
            Verdict::Rejected => return Err((ErrorCode::ContentRejected, "message contains a blocked word".into())),
        };
        let from = self.participant(key);
        let mut ops = Vec::new();
        let mut effects = Vec::new();
        let is_agent = key.starts_with("agent:");
        self.append(conv, fid, from, Body::Message { text }, Some(conn), &mut ops, &mut effects);
        if is_agent {
            if let Some(c) = self.convs.get_mut(conv) {
                if c.meta.first_response_ms.is_none() {
                    let now = now_ms();
                    c.meta.first_response_ms = Some(now);
                    self.metrics.first_response.observe(now.saturating_sub(c.meta.created_ms) as f64 / 1000.0);
                    ops.push(self.meta_op(conv));
                }
            }
        }
        self.commit(ops, effects, at);
        Ok(())
    }

    /// The common start of every state-changing frame on a conversation: check the frame id, load the
    /// conversation (and check ownership), and answer a retry of an already-applied frame with its original
    /// ack. `Ok(true)` means the frame was a retry and is fully answered.
    pub(super) fn retried(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        conv: &str,
    ) -> Result<bool, (ErrorCode, String)> {
        check_id(fid)?;
        self.ensure_conv(conv)?;
        Ok(self.answer_retry(conn, key, fid, conv))
    }

    /// If `fid` was already appended by this participant, answer with the original ack.
    pub(super) fn answer_retry(&mut self, conn: ConnId, key: &str, fid: &str, conv: &str) -> bool {
        let Some(c) = self.convs.get_mut(conv) else { return false };
        let idem_key = format!("{key}/{fid}");
        let seq = match c.idem.get(&idem_key) {
            Some(s) => *s,
            None if c.idem_complete => return false,
            None => match self.store.idempotent_seq(conv, &idem_key) {
                Ok(Some(s)) => s,
                _ => return false,
            },
        };
        if seq <= c.durable_seq {
            let frame =
                ServerFrame::Ack { id: fid.to_owned(), conv: Some(conv.to_owned()), seq: Some(seq), duplicate: true };
            self.push(conn, &frame);
        } else {
            c.waiters.entry(seq).or_default().push((conn, fid.to_owned()));
        }
        true
    }

    /// Assign the next seq and stage the entry's write and effects.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn append(
        &mut self,
        conv: &str,
        fid: &str,
        from: Participant,
        body: Body,
        ack_conn: Option<ConnId>,
        ops: &mut Vec<Op>,
        effects: &mut Vec<Effect>,
    ) {
        let now = now_ms();
        let hlc = self.hlc.tick(now);
        let Some(c) = self.convs.get_mut(conv) else { return };
        c.next_seq += 1;
        let seq = c.next_seq;
        let idem_key = format!("{}/{fid}", from.key());
        c.idem.insert(idem_key.clone(), seq);
        let entry = Entry { seq, id: fid.to_owned(), from, hlc, ts: now, body };
        ops.push(Op::Entry { conv: conv.to_owned(), seq, json: encode(&entry), idem: Some(idem_key) });
        effects.push(Effect::Entry {
            conv: conv.to_owned(),
            entry: Arc::new(entry),
            ack: ack_conn.map(|c| (c, fid.to_owned())),
        });
    }

    pub(super) fn replay(&mut self, conn: ConnId, fid: Option<&str>, conv: &str, last_seq: u64) {
        let Some(c) = self.convs.get(conv) else { return };
        let durable = c.durable_seq;
        if last_seq > durable || durable - last_seq > self.cfg.limits.replay_limit as u64 {
            let frame = ServerFrame::Error {
                id: fid.map(str::to_owned),
                code: ErrorCode::Reload,
                message: "cannot replay this gap; fetch history and resume from its last seq".into(),
                conv: Some(conv.to_owned()),
                last_seq: Some(durable),
            };
            self.metrics.errors.with_label_values(&[ErrorCode::Reload.as_str()]).inc();
            self.push(conn, &frame);
            return;
        }
        let entries: Vec<Entry> = if c.recent.front().is_some_and(|e| e.seq <= last_seq + 1) || last_seq == durable {
            c.recent.iter().filter(|e| e.seq > last_seq && e.seq <= durable).map(|e| (**e).clone()).collect()
        } else {
            match self.store.entries_after(conv, last_seq, (durable - last_seq) as usize) {
                Ok(v) => v.into_iter().filter(|e| e.seq <= durable).collect(),
                Err(e) => {
                    tracing::error!(error = %e, conv, "replay read failed");
                    self.error(conn, fid, ErrorCode::Internal, "history read failed", Some(conv));
                    return;
                }
            }
        };
        let frame = ServerFrame::Replay { conv: conv.to_owned(), entries, last_seq: durable };
        self.push(conn, &frame);
    }

    pub(super) fn typing(&mut self, key: &str, conv: &str, on: bool) -> Result<(), (ErrorCode, String)> {
        self.ensure_conv(conv)?;
        let from = self.participant(key);
        let c = self.convs.get(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        if !self.is_participant(key, c) {
            return Err((ErrorCode::Forbidden, "you are not a participant of this conversation".into()));
        }
        let interval = Duration::from_millis(self.cfg.typing.interval_ms);
        let now = Instant::now();
        let Some(c) = self.convs.get_mut(conv) else { return Ok(()) };
        let due = c.typing.last_forward.is_none_or(|t| now.duration_since(t) >= interval);
        if due {
            c.typing.last_forward = Some(now);
            c.typing.pending.remove(&from.key());
            self.forward_typing(conv, &from, on);
        } else {
            c.typing.pending.insert(from.key(), (from, on));
            self.typing_due.insert(conv.to_owned());
        }
        Ok(())
    }

    pub(super) fn forward_typing(&mut self, conv: &str, from: &Participant, on: bool) {
        let frame =
            ServerFrame::Typing { conv: conv.to_owned(), from: from.clone(), on, ttl_ms: self.cfg.typing.ttl_ms };
        let out: Out = Arc::from(frame.to_json());
        let author = from.key();
        for t in self.participant_conns(conv) {
            if self.conns.get(&t).is_some_and(|s| s.key != author) {
                self.push_out(t, out.clone());
            }
        }
    }

    pub(super) fn read(&mut self, _conn: ConnId, key: &str, conv: &str, seq: u64) -> Result<(), (ErrorCode, String)> {
        self.ensure_conv(conv)?;
        let by = self.participant(key);
        let c = self.convs.get_mut(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        let allowed = match split_key(key) {
            ("visitor", pid) => c.meta.visitor == pid,
            (_, pid) => c.meta.agent.as_deref() == Some(pid),
        };
        if !allowed {
            return Err((ErrorCode::Forbidden, "you are not a participant of this conversation".into()));
        }
        let seq = seq.min(c.durable_seq);
        let cur = c.meta.cursors.entry(key.to_owned()).or_insert(0);
        if seq <= *cur {
            return Ok(());
        }
        *cur = seq;
        self.dirty_meta.insert(conv.to_owned());
        let frame = ServerFrame::Read { conv: conv.to_owned(), by, seq };
        let out: Out = Arc::from(frame.to_json());
        for t in self.participant_conns(conv) {
            if self.conns.get(&t).is_some_and(|s| s.key != key) {
                self.push_out(t, out.clone());
            }
        }
        Ok(())
    }

    pub(super) fn accept(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        conv: &str,
        at: Instant,
    ) -> Result<(), (ErrorCode, String)> {
        if self.retried(conn, key, fid, conv)? {
            return Ok(());
        }
        let (_, aid) = split_key(key);
        let c = self.convs.get(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        if c.meta.agent.as_deref() == Some(aid) && c.meta.state == ConvState::Assigned {
            self.push(
                conn,
                &ServerFrame::Ack { id: fid.to_owned(), conv: Some(conv.to_owned()), seq: None, duplicate: true },
            );
            return Ok(());
        }
        if c.offer.as_ref().is_none_or(|o| o.agent != aid) {
            return Err((ErrorCode::Conflict, "this conversation is not offered to you".into()));
        }
        let aid = aid.to_owned();
        self.assign(conv, &aid, fid, Some(conn), "accept", at);
        Ok(())
    }

    /// Move an offered or transferred conversation to `agent`. Capacity was reserved by the offer.
    pub(super) fn assign(
        &mut self,
        conv: &str,
        agent: &str,
        fid: &str,
        ack_conn: Option<ConnId>,
        via: &str,
        at: Instant,
    ) {
        let now = now_ms();
        let Some(c) = self.convs.get_mut(conv) else { return };
        c.offer = None;
        c.declined.clear();
        let queued_ms = c.meta.queued_ms.take();
        self.queue.remove(&(queued_ms.unwrap_or(c.meta.created_ms), conv.to_owned()));
        c.meta.state = ConvState::Assigned;
        c.meta.agent = Some(agent.to_owned());
        c.meta.assigned_ms = Some(now);
        c.last_position = None;
        if let Some(q) = queued_ms {
            let waited = now.saturating_sub(q) as f64;
            self.metrics.queue_wait.observe(waited / 1000.0);
            self.wait_ema_ms = Some(self.wait_ema_ms.map_or(waited, |e| 0.8 * e + 0.2 * waited));
        }
        let agent_name = match self.agents.get_mut(agent) {
            Some(a) => {
                a.offered.remove(conv);
                a.assigned.insert(conv.to_owned());
                a.agent.name.clone()
            }
            None => agent.to_owned(),
        };
        self.metrics.assignments.with_label_values(&[via]).inc();
        let from = Participant::agent(agent, &agent_name);
        let mut ops = Vec::new();
        let mut effects = Vec::new();
        let event = Event::Assigned { agent: agent.to_owned(), agent_name };
        self.append(conv, fid, from, Body::Event { event }, ack_conn, &mut ops, &mut effects);
        ops.push(self.meta_op(conv));
        effects.push(Effect::Summary { conv: conv.to_owned(), extra: vec![] });
        self.commit(ops, effects, at);
        self.update_gauges();
        self.send_positions();
    }

    pub(super) fn decline(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        conv: &str,
    ) -> Result<(), (ErrorCode, String)> {
        self.ensure_conv(conv)?;
        let (_, aid) = split_key(key);
        let c = self.convs.get(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        if c.offer.as_ref().is_none_or(|o| o.agent != aid) {
            return Err((ErrorCode::Conflict, "this conversation is not offered to you".into()));
        }
        self.withdraw_offer(conv, true);
        self.push(
            conn,
            &ServerFrame::Ack { id: fid.to_owned(), conv: Some(conv.to_owned()), seq: None, duplicate: false },
        );
        self.dispatch();
        Ok(())
    }

    /// Cancel the live offer of `conv`, releasing the agent's reserved slot.
    pub(super) fn withdraw_offer(&mut self, conv: &str, exclude_agent: bool) {
        let Some(c) = self.convs.get_mut(conv) else { return };
        let Some(offer) = c.offer.take() else { return };
        if exclude_agent {
            c.declined.push(offer.agent.clone());
        }
        let mut conns = Vec::new();
        if let Some(a) = self.agents.get_mut(&offer.agent) {
            a.offered.remove(conv);
            conns = a.conns.clone();
        }
        let out: Out = Arc::from(ServerFrame::OfferWithdrawn { conv: conv.to_owned() }.to_json());
        for t in conns {
            self.push_out(t, out.clone());
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn transfer(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        conv: &str,
        to_agent: Option<String>,
        to_skill: Option<String>,
        at: Instant,
    ) -> Result<(), (ErrorCode, String)> {
        if self.retried(conn, key, fid, conv)? {
            return Ok(());
        }
        let (_, aid) = split_key(key);
        let aid = aid.to_owned();
        let c = self.convs.get(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        let admin = self.agents.get(&aid).is_some_and(|a| a.agent.admin);
        if c.meta.state != ConvState::Assigned || (c.meta.agent.as_deref() != Some(aid.as_str()) && !admin) {
            return Err((ErrorCode::Conflict, "only the assigned agent can transfer an assigned conversation".into()));
        }
        let from_agent = c.meta.agent.clone();
        let old_conns: Vec<ConnId> =
            from_agent.as_ref().and_then(|a| self.agents.get(a)).map(|a| a.conns.clone()).unwrap_or_default();
        match (to_agent, to_skill) {
            (Some(target), None) => {
                if from_agent.as_deref() == Some(target.as_str()) {
                    return Err((ErrorCode::Invalid, "conversation is already assigned to that agent".into()));
                }
                let t = self.agents.get(&target).ok_or((ErrorCode::NotFound, "no such agent".to_owned()))?;
                if !t.available() {
                    return Err((ErrorCode::Conflict, "target agent is not online".into()));
                }
                if t.load() >= t.agent.capacity {
                    return Err((ErrorCode::Conflict, "target agent is at capacity".into()));
                }
                self.release_agent(conv);
                let from = self.participant(key);
                let mut ops = Vec::new();
                let mut effects = Vec::new();
                let event = Event::Transferred { from_agent, to_agent: Some(target.clone()), to_skill: None };
                self.append(conv, fid, from, Body::Event { event }, Some(conn), &mut ops, &mut effects);
                // Old agent sees the transfer entry and the new summary, then loses access.
                copy_last_entry_to(conv, &old_conns, &mut effects);
                effects.push(Effect::Summary { conv: conv.to_owned(), extra: old_conns });
                self.commit(ops, effects, at);
                if let Some(a) = self.agents.get_mut(&target) {
                    a.offered.insert(conv.to_owned());
                }
                if let Some(c) = self.convs.get_mut(conv) {
                    c.meta.queued_ms = None;
                }
                let efid = new_id("e");
                self.assign(conv, &target, &efid, None, "transfer", at);
            }
            (None, Some(skill)) => {
                if skill.is_empty() || skill.len() > 32 {
                    return Err((ErrorCode::Invalid, "skill: 1..=32 characters".into()));
                }
                self.release_agent(conv);
                let Some(c) = self.convs.get_mut(conv) else { return Ok(()) };
                c.meta.state = ConvState::Queued;
                c.meta.agent = None;
                c.meta.skills = vec![skill.clone()];
                // Keep the original arrival time: a transferred visitor has waited already.
                let q = c.meta.created_ms;
                c.meta.queued_ms = Some(q);
                if let Some(prev) = from_agent.clone() {
                    c.declined = vec![prev];
                }
                self.queue.insert((q, conv.to_owned()));
                let from = self.participant(key);
                let mut ops = Vec::new();
                let mut effects = Vec::new();
                let event = Event::Transferred { from_agent, to_agent: None, to_skill: Some(skill) };
                self.append(conv, fid, from, Body::Event { event }, Some(conn), &mut ops, &mut effects);
                copy_last_entry_to(conv, &old_conns, &mut effects);
                ops.push(self.meta_op(conv));
                effects.push(Effect::Summary { conv: conv.to_owned(), extra: old_conns });
                effects.push(Effect::Position { conv: conv.to_owned() });
                self.commit(ops, effects, at);
                self.update_gauges();
                self.dispatch();
            }
            _ => return Err((ErrorCode::Invalid, "give exactly one of to_agent or to_skill".into())),
        }
        Ok(())
    }

    /// Remove the conversation from its agent's load.
    pub(super) fn release_agent(&mut self, conv: &str) {
        let Some(c) = self.convs.get_mut(conv) else { return };
        if let Some(a) = c.meta.agent.take().and_then(|a| self.agents.get_mut(&a)) {
            a.assigned.remove(conv);
        }
    }

    pub(super) fn close(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        conv: &str,
        at: Instant,
    ) -> Result<(), (ErrorCode, String)> {
        if self.retried(conn, key, fid, conv)? {
            return Ok(());
        }
        let c = self.convs.get(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        let (_, pid) = split_key(key);
        let admin = key.starts_with("agent:") && self.agents.get(pid).is_some_and(|a| a.agent.admin);
        if !self.is_participant(key, c) && !admin {
            return Err((ErrorCode::Forbidden, "you are not a participant of this conversation".into()));
        }
        if c.meta.state == ConvState::Closed {
            return Err((ErrorCode::Conflict, "conversation is already closed".into()));
        }
        let agent = c.meta.agent.clone();
        self.withdraw_offer(conv, false);
        // The agent stays on record (history, filters, rating) but no longer carries the load.
        if let Some(a) = agent.and_then(|a| self.agents.get_mut(&a)) {
            a.assigned.remove(conv);
        }
        let Some(c) = self.convs.get_mut(conv) else { return Ok(()) };
        if let Some(q) = c.meta.queued_ms.take() {
            self.queue.remove(&(q, conv.to_owned()));
        }
        c.meta.state = ConvState::Closed;
        c.meta.closed_ms = Some(now_ms());
        let visitor = c.meta.visitor.clone();
        if let Some(v) = self.visitors.get_mut(&visitor) {
            v.open.remove(conv);
        }
        let by = key.to_owned();
        let from = self.participant(key);
        let mut ops = Vec::new();
        let mut effects = Vec::new();
        self.append(conv, fid, from, Body::Event { event: Event::Closed { by } }, Some(conn), &mut ops, &mut effects);
        ops.push(self.meta_op(conv));
        effects.push(Effect::Summary { conv: conv.to_owned(), extra: vec![] });
        self.commit(ops, effects, at);
        self.update_gauges();
        self.dispatch();
        self.send_positions();
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rate(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        conv: &str,
        score: u8,
        comment: Option<String>,
        at: Instant,
    ) -> Result<(), (ErrorCode, String)> {
        if self.retried(conn, key, fid, conv)? {
            return Ok(());
        }
        if !(1..=5).contains(&score) {
            return Err((ErrorCode::Invalid, "score must be 1..=5".into()));
        }
        if comment.as_ref().is_some_and(|c| c.chars().count() > 1000) {
            return Err((ErrorCode::Invalid, "comment: at most 1000 characters".into()));
        }
        let c = self.convs.get_mut(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        let (_, vid) = split_key(key);
        if c.meta.visitor != vid {
            return Err((ErrorCode::Forbidden, "only the visitor can rate".into()));
        }
        if c.meta.state == ConvState::Queued || c.meta.state == ConvState::Bot {
            return Err((ErrorCode::Conflict, "nothing to rate yet".into()));
        }
        c.meta.rating = Some(Rating { score, comment: comment.clone() });
        let from = self.participant(key);
        let mut ops = Vec::new();
        let mut effects = Vec::new();
        self.append(
            conv,
            fid,
            from,
            Body::Event { event: Event::Rated { score, comment } },
            Some(conn),
            &mut ops,
            &mut effects,
        );
        ops.push(self.meta_op(conv));
        self.commit(ops, effects, at);
        Ok(())
    }

    pub(super) fn presence(&mut self, key: &str, status: AgentStatus) {
        let (_, aid) = split_key(key);
        let aid = aid.to_owned();
        let Some(a) = self.agents.get_mut(&aid) else { return };
        if a.status == status {
            return;
        }
        a.status = status;
        if status != AgentStatus::Online {
            let offered: Vec<String> = a.offered.iter().cloned().collect();
            for conv in offered {
                self.withdraw_offer(&conv, true);
            }
        }
        self.broadcast_presence(&aid, status);
        self.dispatch();
    }

    pub(super) fn watch(&mut self, conn: ConnId, conv: &str) -> Result<(), (ErrorCode, String)> {
        self.ensure_conv(conv)?;
        if let Some(c) = self.convs.get_mut(conv) {
            c.watchers.insert(conn);
            if let Some(s) = self.conns.get_mut(&conn) {
                s.watching.insert(conv.to_owned());
            }
        }
        if let Some(s) = self.summary(conv) {
            self.push(conn, &ServerFrame::Conversation { conv: s });
        }
        Ok(())
    }

    pub(super) fn broadcast_presence(&mut self, agent: &str, status: AgentStatus) {
        let out: Out = Arc::from(ServerFrame::Presence { agent: agent.to_owned(), status }.to_json());
        let targets: Vec<ConnId> = self.agents.values().flat_map(|a| a.conns.iter().copied()).collect();
        for t in targets {
            self.push_out(t, out.clone());
        }
    }
}

/// Also deliver the entry just staged to `conns` (participants who are leaving with this entry and so are
/// no longer reached by the fan-out when it becomes durable).
fn copy_last_entry_to(conv: &str, conns: &[ConnId], effects: &mut Vec<Effect>) {
    if let Some(Effect::Entry { entry, .. }) = effects.last() {
        let out: Out = Arc::from(ServerFrame::Msg { conv: conv.to_owned(), entry: (**entry).clone() }.to_json());
        effects.extend(conns.iter().map(|t| Effect::Frame { conn: *t, out: out.clone() }));
    }
}
