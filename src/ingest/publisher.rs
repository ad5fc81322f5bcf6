//! The downlink's `publish` commands, out through a connection of their own (see
//! [`CommandPublisher`] for why).

use super::*;

/// A message a cloud command sends to a device through the local broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub topic: String,
    pub payload: Vec<u8>,
    /// 0 or 1.
    pub qos: u8,
    pub retain: bool,
}

/// Publishes the downlink's commands to the local broker and reports the broker's PUBACK.
///
/// Its own short-lived connection per command, with client id `<client_id>-cmd`, rather than a
/// request channel into the `mqtt` thread: that thread acks with `set_manual_acks` and its PUBACK
/// events for our publishes would have to be told apart from the acks it sends (rumqttc 0.25 reports
/// outgoing pkids only as events, after the fact), and a stalled command must never delay the
/// PUBACKs that ingest owes the broker. Commands are rare and human-paced, so a connection each
/// costs little, keeps no idle keep-alive state, and makes correlation trivial: the one PUBLISH in
/// flight. The id differs from the ingest client's, since a broker disconnects the older of two
/// clients with the same id; `clean_session = true`, so nothing outlives the command.
#[derive(Clone)]
pub struct CommandPublisher {
    opts: MqttOptions,
}

impl CommandPublisher {
    pub fn new(cfg: &MqttConfig, client_id: &str) -> CommandPublisher {
        let mut opts = options(cfg, format!("{client_id}-cmd"));
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(
                cfg.max_packet_size as usize + 1024,
                cfg.max_packet_size as usize + 1024,
            );
        CommandPublisher { opts }
    }

    /// Publishes `p` and returns once the broker acknowledged it (QoS1) or it was written (QoS0),
    /// or an error saying why not, by `timeout` (at least the connect deadline), or within `POLL`
    /// of `shutdown`.
    pub fn publish(
        &self,
        p: &Publication,
        timeout: Duration,
        shutdown: &Shutdown,
    ) -> Result<(), String> {
        let qos = if p.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let deadline = Instant::now() + timeout.max(Duration::from_secs(CONNECT_TIMEOUT_SECS + 1));
        let (client, mut connection) = client(self.opts.clone(), 4);
        client
            .try_publish(p.topic.clone(), qos, p.retain, p.payload.clone())
            .map_err(|e| format!("cannot publish to topic {:?}: {e}", p.topic))?;
        let mut sent: Option<u16> = None;
        let outcome = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(format!("the broker did not acknowledge within {timeout:?}"));
            }
            if shutdown.is_set() {
                break Err(
                    "the agent is stopping; not known whether the broker took it".to_owned(),
                );
            }
            match connection.recv_timeout(left.min(POLL)) {
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid)))) => {
                    if qos == QoS::AtMostOnce {
                        break Ok(());
                    }
                    sent = Some(pkid);
                }
                Ok(Ok(Event::Incoming(Incoming::PubAck(ack)))) if Some(ack.pkid) == sent => {
                    break Ok(());
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => break Err(format!("broker connection failed: {e}")),
                Err(rumqttc::RecvTimeoutError::Timeout) => {}
                Err(rumqttc::RecvTimeoutError::Disconnected) => {
                    break Err("broker connection closed".to_owned());
                }
            }
        };
        if client.try_disconnect().is_ok() {
            let end = Instant::now() + Duration::from_millis(500);
            while Instant::now() < end {
                match connection.recv_timeout(POLL) {
                    Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) => break,
                    Err(rumqttc::RecvTimeoutError::Disconnected) => break,
                    _ => {}
                }
            }
        }
        outcome
    }
}
