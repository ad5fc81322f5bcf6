//! The `mqtt` thread ([`MqttLoop`]): owns the broker connection, hands each PUBLISH to the
//! writer in arrival order, and sends the PUBACKs of what the writer reports durable, in the same
//! order (see the module header of `ingest` for the whole path and its promises).

use super::*;

pub(super) struct MqttLoop {
    cfg: MqttConfig,
    clock: Clock,
    /// Follows Sparkplug B edge nodes for upstream gaps (`sparkplug`).
    tracker: Tracker,
    client: Client,
    connection: Connection,
    tx: SyncSender<Delivery>,
    durable: Arc<AtomicU64>,
    stats: Arc<Stats>,
    shutdown: Shutdown,
    next_index: u64,
    /// QoS1 messages of the current connection not yet acked, in arrival order: index, what the
    /// PUBACK needs, and when it arrived (for the PUBACK delay).
    unacked: VecDeque<(u64, QoS, u16, Instant)>,
    /// Messages not handed to the writer yet (no room in its channel, or `PUBACK_WINDOW` full), in
    /// arrival order.
    overflow: VecDeque<Delivery>,
    /// Packet ids of the QoS1 messages handed to the writer on this connection whose PUBACK has not
    /// been written yet (see `PUBACK_WINDOW`).
    awaiting_puback: HashSet<u16>,
    /// See [`Shared::queued`].
    queued: Arc<AtomicUsize>,
    /// See [`Shared::window_full`].
    window_full: Arc<AtomicBool>,
    /// See `OVERFLOW_MESSAGES`.
    overflow_limit: usize,
    /// QoS1 messages left with the broker on this connection (see the module header).
    left_with_broker: u64,
    /// When a DISCONNECT was sent to take the messages left with the broker back.
    retaking: Option<Instant>,
    backoff: Backoff,
    connected_at: Option<Instant>,
    /// The same connection error again and again is said once a minute, not per attempt.
    errors_log: Repeats,
    /// The journal staying behind is said once a minute, not per reconnect to catch up.
    behind_log: Repeats,
    /// The durable watermark as last seen, and when it was seen to move (see `ack_poll`).
    durable_seen: u64,
    durable_moved: Instant,
    /// `journal.commit_wait`: how long the writer may hold a group open (see `ack_poll`).
    commit_wait: Duration,
    /// Test failpoint `FERRY_FAILPOINT=hold_pubacks`: no PUBACK is ever sent, so the broker holds
    /// every message it delivered in flight (a PUBACK backlog that never drains).
    hold_pubacks: bool,
}

impl MqttLoop {
    pub(super) fn new(
        cfg: MqttConfig,
        commit_wait: Duration,
        client_id: String,
        tx: SyncSender<Delivery>,
        shared: Shared,
        tracker: Tracker,
    ) -> MqttLoop {
        let Shared {
            clock,
            stats,
            shutdown,
            durable,
            queued,
            window_full,
            ..
        } = shared;
        let mut opts = options(&cfg, client_id);
        opts.set_keep_alive(cfg.keep_alive)
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(
                read_limit(cfg.max_packet_size),
                cfg.max_packet_size as usize,
            );
        let (client, connection) = client(opts, 1024);
        let backoff = Backoff::new(Duration::from_millis(200), cfg.max_backoff);
        MqttLoop {
            cfg,
            clock,
            tracker,
            client,
            connection,
            tx,
            durable,
            stats,
            shutdown,
            next_index: 1,
            unacked: VecDeque::new(),
            overflow: VecDeque::new(),
            awaiting_puback: HashSet::new(),
            queued,
            window_full,
            overflow_limit: failpoint::number("ingest_overflow")
                .map_or(OVERFLOW_MESSAGES, |n| n as usize),
            left_with_broker: 0,
            retaking: None,
            backoff,
            connected_at: None,
            errors_log: Repeats::new(REPEAT_LOG),
            behind_log: Repeats::new(REPEAT_LOG),
            durable_seen: 0,
            durable_moved: Instant::now(),
            commit_wait,
            hold_pubacks: failpoint::is_set("hold_pubacks"),
        }
    }

    pub(super) fn run(mut self) {
        info!(
            "mqtt connecting host={} port={} topics={:?}",
            self.cfg.host, self.cfg.port, self.cfg.topics
        );
        while !self.shutdown.is_set() {
            let connected = self.stats.mqtt_connected.load(Ordering::Relaxed);
            // rumqttc wakes this thread for the connection and its request queue only, not for
            // the writer: while messages wait for their commit, look for it often.
            let poll = match (connected, self.unacked.is_empty()) {
                (false, _) => CONNECT_POLL,
                (true, false) => self.ack_poll(),
                (true, true) => POLL,
            };
            match self.connection.recv_timeout(poll) {
                Ok(Ok(event)) => self.on_event(event),
                Ok(Err(e)) => self.on_error(e),
                Err(rumqttc::RecvTimeoutError::Timeout) => {}
                Err(rumqttc::RecvTimeoutError::Disconnected) => break,
            }
            self.feed_writer();
            self.send_acks();
            self.retake_left_messages();
        }
        self.finish();
    }

    /// The poll timeout while messages wait for their commit. The commit is expected
    /// `commit_wait` after the current wait began (when the durable watermark last moved or the
    /// oldest waiting message arrived, whichever is later; at once while the window is full, as
    /// the writer then does not wait). Until then the loop sleeps towards that moment; after it,
    /// the poll is a quarter of how long the commit has been overdue, between `ACK_POLL` and
    /// `POLL`. So a PUBACK goes out at most about a quarter of its commit's own time after the
    /// commit (1 ms after a fast one), whatever the `commit_wait`, and a commit the disk takes
    /// seconds over wakes this thread a few dozen times, not every millisecond.
    fn ack_poll(&mut self) -> Duration {
        let durable = self.durable.load(Ordering::Acquire);
        let now = Instant::now();
        if durable != self.durable_seen {
            self.durable_seen = durable;
            self.durable_moved = now;
        }
        let since = self
            .unacked
            .front()
            .map_or(self.durable_moved, |&(_, _, _, arrived)| {
                arrived.max(self.durable_moved)
            });
        let wait = if self.window_full.load(Ordering::Relaxed) {
            Duration::ZERO
        } else {
            self.commit_wait
        };
        let expected = since + wait;
        match expected.checked_duration_since(now) {
            Some(left) if !left.is_zero() => left.clamp(ACK_POLL, POLL),
            _ => (now.saturating_duration_since(expected) / 4).clamp(ACK_POLL, POLL),
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Incoming(Incoming::ConnAck(ack)) => {
                info!("mqtt connected session_present={}", ack.session_present);
                self.stats.set_mqtt_error(None);
                self.stats.mqtt_connected.store(true, Ordering::Relaxed);
                // The backoff resets only once this connection has proven stable (see `on_error`):
                // a broker that accepts and then drops us at once must not be retried in a loop.
                self.connected_at = Some(Instant::now());
                self.unacked.clear();
                self.awaiting_puback.clear();
                self.left_with_broker = 0;
                self.retaking = None;
                let filters = self
                    .cfg
                    .topics
                    .iter()
                    .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                if let Err(e) = self.client.try_subscribe_many(filters) {
                    error!("mqtt subscribe request failed: {}", e);
                }
            }
            Event::Incoming(Incoming::SubAck(ack)) => {
                for (filter, code) in self.cfg.topics.iter().zip(ack.return_codes.iter()) {
                    match code {
                        rumqttc::SubscribeReasonCode::Failure => {
                            error!(
                                "mqtt broker refused subscription filter={} (check the broker's ACL)",
                                filter
                            )
                        }
                        rumqttc::SubscribeReasonCode::Success(qos) => {
                            debug!("mqtt subscribed filter={} qos={:?}", filter, qos)
                        }
                    }
                }
            }
            Event::Incoming(Incoming::Publish(p)) => self.on_publish(p),
            Event::Outgoing(Outgoing::PubAck(pkid)) => {
                self.awaiting_puback.remove(&pkid);
            }
            _ => {}
        }
    }

    fn on_publish(&mut self, p: Publish) {
        trace!(
            "mqtt publish topic={} pkid={} qos={:?} dup={} bytes={}",
            p.topic,
            p.pkid,
            p.qos,
            p.dup,
            p.payload.len()
        );
        let qos1 = p.qos != QoS::AtMostOnce;
        let behind = self.queued.load(Ordering::Relaxed) > QUEUE_BYTES
            || self.overflow.len() >= self.overflow_limit;
        let retaking = self.retaking.is_some();
        if qos1 && (behind || self.left_with_broker > 0 || retaking) {
            // Not acknowledged, so the broker keeps it; it comes back after the reconnect.
            if self.left_with_broker == 0 && !retaking {
                let message = "journal is behind: leaving new messages with the broker until it \
                               catches up, then reconnecting to take them";
                let waiting = format!(
                    "waiting={} waiting_bytes={}",
                    self.overflow.len(),
                    self.queued.load(Ordering::Relaxed)
                );
                if self.behind_log.is_due(message, Instant::now()) {
                    warn!("{message} {waiting}");
                } else {
                    debug!("{message} {waiting}");
                }
            }
            self.left_with_broker += 1;
            Stats::add(&self.stats.left_with_broker, 1);
            return;
        }
        if !qos1 && behind {
            Stats::add(&self.stats.qos0_dropped, 1);
            warn!(
                "journal is behind: dropped a QoS0 message topic={} (use QoS1 for delivery guarantees)",
                p.topic
            );
            return;
        }
        self.observe_sparkplug(&p);
        let index = self.next_index;
        self.next_index += 1;
        let record = self.to_record(&p);
        if qos1 {
            self.unacked
                .push_back((index, p.qos, p.pkid, Instant::now()));
        }
        self.queued
            .fetch_add(record.payload.len(), Ordering::Relaxed);
        self.overflow.push_back(Delivery { index, record });
    }

    /// Messages left with the broker come back only on a new connection: once everything taken on
    /// this one is journaled and its PUBACK written, disconnect cleanly (the broker reads the
    /// PUBACKs before the DISCONNECT) and let the next poll reconnect.
    fn retake_left_messages(&mut self) {
        if let Some(since) = self.retaking {
            // The broker closes the connection on a DISCONNECT; one that does not is not waited
            // for beyond RETAKE_CLOSE (the messages left with it would never come back).
            if since.elapsed() >= RETAKE_CLOSE {
                warn!(
                    "mqtt broker did not close the connection within {RETAKE_CLOSE:?} of DISCONNECT; \
                     dropping it"
                );
                self.connection.eventloop.clean();
                self.on_error(ConnectionError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no close after DISCONNECT",
                )));
            }
            return;
        }
        if self.left_with_broker == 0
            || !self.overflow.is_empty()
            || !self.unacked.is_empty()
            || !self.awaiting_puback.is_empty()
        {
            return;
        }
        debug!(
            "mqtt reconnecting to take the {} messages left with the broker",
            self.left_with_broker
        );
        if self.client.try_disconnect().is_ok() {
            self.retaking = Some(Instant::now());
        }
    }

    /// An upstream gap the Sparkplug tracker finds in `p` is journaled just before it (a record
    /// of its own, not an MQTT delivery); a rebirth request goes to the edge node.
    fn observe_sparkplug(&mut self, p: &Publish) {
        if !crate::sparkplug::is_sparkplug_topic(&p.topic) {
            return;
        }
        // Stamped before the message's own record is: no later than it.
        let seen = self
            .tracker
            .observe(&p.topic, &p.payload, journal::now_ms(), Instant::now());
        if let Some(gap) = seen.gap {
            if crate::sparkplug::event_topic(&gap) == crate::sparkplug::UPSTREAM_GAP_TOPIC {
                warn!("sparkplug upstream gap: {gap}");
            } else {
                info!(
                    "sparkplug: first data of a node since ferry started, before its birth: {gap}"
                );
            }
            let (ts_ms, mono) = self.clock.stamp();
            let record = NewRecord {
                ts_ms,
                topic: crate::sparkplug::event_topic(&gap).into(),
                payload: gap.to_string().into_bytes(),
                format: StoredFormat::Json,
                parse_error: false,
                mono,
                too_large: None,
                mqtt: None,
            };
            let index = self.next_index;
            self.next_index += 1;
            self.queued
                .fetch_add(record.payload.len(), Ordering::Relaxed);
            self.overflow.push_back(Delivery { index, record });
        }
        if let Some((topic, payload)) = seen.rebirth {
            // Sparkplug B 3.0: commands (NCMD) are published at QoS 0.
            match self
                .client
                .try_publish(&topic, QoS::AtMostOnce, false, payload)
            {
                Ok(()) => info!("sparkplug: asked {topic} for a rebirth"),
                Err(e) => warn!("sparkplug: cannot ask {topic} for a rebirth: {e}"),
            }
        }
    }

    fn to_record(&self, p: &Publish) -> NewRecord {
        let mqtt = match p.qos {
            QoS::AtMostOnce => None,
            _ => Some(MqttDelivery {
                pkid: p.pkid,
                dup: p.dup,
            }),
        };
        let (ts_ms, mono) = self.clock.stamp();
        if p.payload.len() as u64 > self.cfg.max_packet_size {
            return NewRecord {
                ts_ms,
                topic: p.topic.clone(),
                payload: Vec::new(),
                format: StoredFormat::Raw,
                parse_error: false,
                mono,
                too_large: Some(p.payload.len() as u64),
                mqtt,
            };
        }
        let wanted = payload::format_for(&self.cfg.parse, &p.topic);
        let c = payload::classify(wanted, &p.topic, &p.payload);
        NewRecord {
            ts_ms,
            topic: p.topic.clone(),
            payload: p.payload.to_vec(),
            format: c.format,
            parse_error: c.parse_error,
            mono,
            too_large: None,
            mqtt,
        }
    }

    fn feed_writer(&mut self) {
        let mut window_full = false;
        self.feed_writer_until(&mut window_full);
        self.window_full.store(window_full, Ordering::Release);
    }

    fn feed_writer_until(&mut self, window_full: &mut bool) {
        while let Some(d) = self.overflow.pop_front() {
            let pkid = d.record.mqtt.map(|m| m.pkid);
            if pkid.is_some() && self.awaiting_puback.len() >= PUBACK_WINDOW {
                // The PUBACKs are behind: journal no further ahead of them (see PUBACK_WINDOW).
                self.overflow.push_front(d);
                *window_full = true;
                return;
            }
            match self.tx.try_send(d) {
                Ok(()) => {
                    if let Some(pkid) = pkid {
                        self.awaiting_puback.insert(pkid);
                    }
                }
                Err(TrySendError::Full(d)) => {
                    self.overflow.push_front(d);
                    return;
                }
                Err(TrySendError::Disconnected(_)) => {
                    // The writer is gone (shutdown); the broker redelivers what was not acked.
                    self.overflow.clear();
                    return;
                }
            }
        }
    }

    fn send_acks(&mut self) {
        if self.hold_pubacks {
            return;
        }
        let durable = self.durable.load(Ordering::Acquire);
        while let Some(&(index, qos, pkid, arrived)) = self.unacked.front() {
            if index > durable {
                return;
            }
            // rumqttc builds the PUBACK from the QoS and packet id alone.
            let mut ack = Publish::new("", qos, Vec::new());
            ack.pkid = pkid;
            match self.client.try_ack(&ack) {
                Ok(()) => {
                    self.unacked.pop_front();
                    self.stats.puback_delay.observe(arrived.elapsed());
                }
                // The request queue is full; the next poll drains it.
                Err(_) => return,
            }
        }
    }

    fn on_error(&mut self, e: ConnectionError) {
        let was_connected = self.stats.mqtt_connected.swap(false, Ordering::Relaxed);
        // Acks belong to the connection the messages came on; the broker redelivers the rest.
        self.unacked.clear();
        self.awaiting_puback.clear();
        self.connection.eventloop.pending.clear();
        self.left_with_broker = 0;
        if self.retaking.take().is_some() {
            // The end of the DISCONNECT this thread sent: reconnect at once, no backoff.
            debug!("mqtt connection closed after disconnect: {e}");
            self.connected_at = None;
            return;
        }
        if self
            .connected_at
            .take()
            .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION)
        {
            self.backoff.reset();
        }
        let delay = self.backoff.next_delay();
        // An oversize packet needs a person (the broker redelivers it forever): ERROR; anything
        // else is a degraded link that retries by itself: WARN.
        let (message, needs_person) = if let ConnectionError::MqttState(
            rumqttc::StateError::Deserialization(
                rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size),
            ),
        ) = &e
        {
            let limit = read_limit(self.cfg.max_packet_size);
            let message = format!(
                "the broker sends a packet of {size} bytes, over ferry's read limit of {limit} bytes; it will \
                 redeliver it on every connect and ingest is blocked: set max_packet_size in mosquitto.conf \
                 (at most {limit} bytes) and remove the message from the broker's queue"
            );
            (message, true)
        } else if was_connected {
            (format!("mqtt connection lost: {e}"), false)
        } else {
            (format!("mqtt connect failed: {e}"), false)
        };
        if !self.errors_log.is_due(&message, Instant::now()) {
            debug!("{}; retrying in {:?}", message, delay);
        } else if needs_person {
            error!("{}", message);
        } else {
            warn!("{}; retrying in {:?}", message, delay);
        }
        self.stats.set_mqtt_error(Some(message));
        self.shutdown.sleep(delay);
    }

    /// Stops intake, gives the writer a moment to make queued messages durable so they can still be
    /// acked, then disconnects cleanly.
    fn finish(mut self) {
        let deadline = Instant::now() + ACK_DRAIN;
        while !self.unacked.is_empty() && Instant::now() < deadline {
            self.feed_writer();
            self.send_acks();
            match self.connection.recv_timeout(POLL) {
                Ok(Err(_)) | Err(rumqttc::RecvTimeoutError::Disconnected) => break,
                Ok(Ok(Event::Outgoing(Outgoing::PubAck(pkid)))) => {
                    self.awaiting_puback.remove(&pkid);
                }
                // Messages arriving now are not taken: they stay with the broker.
                _ => {}
            }
        }
        if !self.unacked.is_empty() {
            info!(
                "mqtt shutting down with {} messages not yet acked; the broker keeps them",
                self.unacked.len()
            );
        }
        drop(self.tx);
        // After DISCONNECT, keep reading until the broker closes the connection. Closing our end
        // with messages still unread in the socket makes the kernel send a reset instead of a FIN,
        // and the broker then throws away the PUBACKs it had not read yet: acked messages would come
        // back as redeliveries after the restart.
        if self.client.try_disconnect().is_ok() {
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                match self.connection.recv_timeout(POLL) {
                    Ok(Err(_)) | Err(rumqttc::RecvTimeoutError::Disconnected) => break,
                    // Publishes arriving now are not acked: the broker keeps them.
                    _ => {}
                }
            }
        }
        self.stats.mqtt_connected.store(false, Ordering::Relaxed);
        info!("mqtt disconnected");
    }
}
