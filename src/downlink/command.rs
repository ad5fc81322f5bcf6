//! Downlink protocol v1 as data: the frames the cloud sends parsed into [`Command`]s, and the frames
//! the agent sends built as JSON. Pure: no sockets, no journal (see `docs/PROTOCOL.md`).
//!
//! Bad input never panics: a frame that is not a JSON object, lacks a field, or names an unknown
//! action becomes a [`Parsed::Refused`] with the command id when one could be read, so the agent
//! can answer it with `ok:false`.

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::ingest::Publication;
use crate::journal::{MAX_COMMAND_ID, Positions};

/// A command the cloud sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub id: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Publish(Publication),
    Status,
    /// `value` as text for `Draft::set` (a TOML value or bare text).
    SetConfig {
        key: String,
        value: String,
    },
    ReplayFrom {
        seq: u64,
    },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Publish(_) => "publish",
            Action::Status => "status",
            Action::SetConfig { .. } => "set_config",
            Action::ReplayFrom { .. } => "replay_from",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Command(Command),
    /// Not executable; answered with `ok:false` when `id` is known, otherwise only logged.
    Refused {
        id: Option<String>,
        error: String,
    },
}

/// Parses one text frame from the cloud.
pub fn parse(text: &str) -> Parsed {
    let refused = |id: Option<String>, error: String| Parsed::Refused { id, error };
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return refused(None, format!("malformed json: {e}")),
    };
    let Some(obj) = v.as_object() else {
        return refused(None, "a frame must be a json object".to_owned());
    };
    let id = match obj.get("id") {
        Some(Value::String(s)) if valid_id(s) => Some(s.clone()),
        Some(Value::String(_)) => {
            return refused(
                None,
                format!("a command id is 1 to {MAX_COMMAND_ID} printable characters"),
            );
        }
        Some(_) => return refused(None, "\"id\" must be a string".to_owned()),
        None => None,
    };
    match obj.get("type").and_then(Value::as_str) {
        Some("command") => {}
        Some(other) => return refused(id, format!("unknown frame type {other:?}")),
        None => return refused(id, "missing \"type\"".to_owned()),
    }
    let Some(id) = id else {
        return refused(None, "a command needs an \"id\"".to_owned());
    };
    match action(obj) {
        Ok(action) => Parsed::Command(Command { id, action }),
        Err(error) => refused(Some(id), error),
    }
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_COMMAND_ID && !s.chars().any(char::is_control)
}

fn action(obj: &Map<String, Value>) -> Result<Action, String> {
    let str_field = |name: &str| -> Result<&str, String> {
        obj.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("missing string field {name:?}"))
    };
    match obj.get("action").and_then(Value::as_str) {
        Some("publish") => {
            let topic = str_field("topic")?;
            crate::config::validate_filter(topic)
                .map_err(|why| format!("topic {topic:?} is invalid: {why}"))?;
            if topic.contains(['+', '#']) {
                return Err(format!(
                    "topic {topic:?} has wildcards: publish needs a topic name"
                ));
            }
            let payload = match (
                obj.get("payload"),
                obj.get("payload_text"),
                obj.get("payload_b64"),
            ) {
                (Some(v), None, None) => v.to_string().into_bytes(),
                (None, Some(Value::String(t)), None) => t.clone().into_bytes(),
                (None, None, Some(Value::String(b))) => base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| format!("payload_b64 is not base64: {e}"))?,
                (None, None, None) => Vec::new(),
                _ => {
                    return Err(
                        "give one of payload (json), payload_text (string), payload_b64 (string)"
                            .to_owned(),
                    );
                }
            };
            let qos = match obj.get("qos") {
                None => 1,
                Some(v) => match v.as_u64() {
                    Some(q @ (0 | 1)) => q as u8,
                    _ => return Err("qos must be 0 or 1".to_owned()),
                },
            };
            let retain = match obj.get("retain") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err("retain must be true or false".to_owned()),
            };
            Ok(Action::Publish(Publication {
                topic: topic.to_owned(),
                payload,
                qos,
                retain,
            }))
        }
        Some("status") => Ok(Action::Status),
        Some("set_config") => {
            let key = str_field("key")?.to_owned();
            let value = match obj.get("value") {
                Some(Value::String(s)) => s.clone(),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                _ => return Err("value must be a string, number or boolean".to_owned()),
            };
            Ok(Action::SetConfig { key, value })
        }
        Some("replay_from") => {
            let seq = obj
                .get("seq")
                .and_then(Value::as_u64)
                .filter(|s| *s > 0)
                .ok_or("seq must be a positive integer")?;
            Ok(Action::ReplayFrom { seq })
        }
        Some(other) => Err(format!(
            "unknown action {other:?}: allowed publish, status, set_config, replay_from"
        )),
        None => Err("missing string field \"action\"".to_owned()),
    }
}

/// The `result` frame answering command `id`.
pub fn result(id: &str, outcome: &Result<Value, String>) -> String {
    let v = match outcome {
        Ok(data) => json!({"type": "result", "id": id, "ok": true, "data": data}),
        Err(error) => json!({"type": "result", "id": id, "ok": false, "error": error}),
    };
    v.to_string()
}

/// The `hello` frame sent first on every connection: the journal's positions (`head_seq`: the
/// highest seq assigned; `held.head_seq`: the highest durable), and `held`, the account of what
/// the gateway holds that uploads carry too (for the center's ledger).
pub fn hello(device_id: &str, p: &Positions, oldest_unsent_ts_ms: Option<u64>) -> String {
    json!({
        "type": "hello",
        "protocol": 1,
        "device_id": device_id,
        "version": env!("CARGO_PKG_VERSION"),
        "head_seq": p.head_seq,
        "acked_seq": p.acked_seq,
        "held": crate::uplink::held(p, oldest_unsent_ts_ms),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> (Option<String>, String) {
        match parse(text) {
            Parsed::Refused { id, error } => (id, error),
            other => panic!("expected refused, got {other:?}"),
        }
    }

    #[test]
    fn a_publish_command_with_a_json_payload_parses() {
        let p = parse(
            r#"{"type":"command","id":"c1","action":"publish","topic":"dev/1/cmd","payload":{"on":true},"retain":true}"#,
        );
        assert_eq!(
            p,
            Parsed::Command(Command {
                id: "c1".into(),
                action: Action::Publish(Publication {
                    topic: "dev/1/cmd".into(),
                    payload: br#"{"on":true}"#.to_vec(),
                    qos: 1,
                    retain: true
                })
            })
        );
    }

    #[test]
    fn text_and_base64_payloads_parse_and_two_payloads_are_refused() {
        let Parsed::Command(c) = parse(
            r#"{"type":"command","id":"a","action":"publish","topic":"t","payload_b64":"AAE=","qos":0}"#,
        ) else {
            panic!()
        };
        assert!(matches!(c.action, Action::Publish(p) if p.payload == [0, 1] && p.qos == 0));
        let (id, e) = refused(
            r#"{"type":"command","id":"a","action":"publish","topic":"t","payload":1,"payload_text":"x"}"#,
        );
        assert_eq!(id.as_deref(), Some("a"));
        assert!(e.contains("one of"), "{e}");
    }

    #[test]
    fn unknown_actions_keep_their_id_for_the_answer() {
        let (id, e) = refused(r#"{"type":"command","id":"x9","action":"reboot"}"#);
        assert_eq!(id.as_deref(), Some("x9"));
        assert!(e.contains("unknown action \"reboot\""), "{e}");
    }

    #[test]
    fn malformed_frames_are_refused_without_an_id() {
        assert_eq!(refused("{not json").0, None);
        assert_eq!(refused("[1,2]").0, None);
        assert_eq!(refused(r#"{"type":"command","action":"status"}"#).0, None);
        let long = "x".repeat(MAX_COMMAND_ID + 1);
        assert_eq!(
            refused(&format!(
                r#"{{"type":"command","id":"{long}","action":"status"}}"#
            ))
            .0,
            None
        );
    }

    #[test]
    fn wildcard_topics_and_bad_qos_are_refused() {
        assert!(
            refused(r#"{"type":"command","id":"a","action":"publish","topic":"a/#"}"#)
                .1
                .contains("wildcards")
        );
        assert!(
            refused(r#"{"type":"command","id":"a","action":"publish","topic":"a","qos":2}"#)
                .1
                .contains("qos")
        );
    }

    #[test]
    fn set_config_values_become_text_and_replay_needs_a_seq() {
        let Parsed::Command(c) = parse(
            r#"{"type":"command","id":"s","action":"set_config","key":"uplink.max_records_per_sec","value":250}"#,
        ) else {
            panic!()
        };
        assert_eq!(
            c.action,
            Action::SetConfig {
                key: "uplink.max_records_per_sec".into(),
                value: "250".into()
            }
        );
        assert!(
            refused(r#"{"type":"command","id":"r","action":"replay_from","seq":0}"#)
                .1
                .contains("seq")
        );
    }

    #[test]
    fn results_carry_the_id_and_either_data_or_error() {
        let ok: Value = serde_json::from_str(&result("a", &Ok(json!({"x":1})))).unwrap();
        assert_eq!(ok["ok"], true);
        assert_eq!(ok["data"]["x"], 1);
        let bad: Value = serde_json::from_str(&result("a", &Err("no".into()))).unwrap();
        assert_eq!(bad["ok"], false);
        assert_eq!(bad["error"], "no");
        assert_eq!(bad["id"], "a");
    }
}
