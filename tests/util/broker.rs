#[allow(unused_imports)]
use super::*;

/// A real mosquitto (see `ferry_testkit::Mosquitto`) with the tests' in-flight window of 20.
pub struct Mosquitto {
    pub port: u16,
    inner: ferry_testkit::Mosquitto,
}

impl Mosquitto {
    /// Starts mosquitto with persistence in `dir` on a free port.
    pub fn start(dir: &Path) -> Mosquitto {
        Self::start_on(dir, free_port(), "")
    }

    /// Starts mosquitto on `port`; `extra_conf` goes last and overrides the defaults.
    pub fn start_on(dir: &Path, port: u16, extra_conf: &str) -> Mosquitto {
        let conf = format!("max_inflight_messages 20\n{extra_conf}");
        let inner = ferry_testkit::Mosquitto::start(dir, port, &conf)
            .unwrap_or_else(|e| panic!("{e} (run .ci/run or apt-get install mosquitto)"));
        Mosquitto { port, inner }
    }

    /// Stops it cleanly (it saves its persistence file) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.inner.restart().unwrap();
    }

    pub fn stop(&mut self) {
        self.inner.stop().unwrap();
    }
}

// Not every test file uses each of these.
#[allow(unused_imports)]
pub use ferry_testkit::{is_root, mosquitto_bin, port_open, signal_pid};

/// Publishes `n` QoS1 messages and returns once the broker acknowledged every one.
pub fn publish(port: u16, topic: &str, payloads: impl IntoIterator<Item = Vec<u8>>) -> usize {
    publish_to(
        port,
        payloads
            .into_iter()
            .map(|p| (topic.to_string(), p))
            .collect(),
    )
}

pub fn publish_to(port: u16, messages: Vec<(String, Vec<u8>)>) -> usize {
    use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
    let id = format!("pub-{}-{}", std::process::id(), free_port());
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 24, 1 << 24);
    opts.set_inflight(100);
    let (client, mut conn) = Client::new(opts, 200);
    let n = messages.len();
    let sender = std::thread::spawn(move || {
        for (topic, payload) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    let end = Instant::now() + Duration::from_secs(60);
    while acked < n {
        assert!(
            Instant::now() < end,
            "publisher: only {acked} of {n} acked by the broker"
        );
        match conn.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => acked += 1,
            Ok(Err(e)) => panic!("publisher connection failed: {e}"),
            _ => {}
        }
    }
    let client = sender.join().unwrap();
    let _ = client.disconnect();
    for _ in 0..10 {
        if matches!(
            conn.recv_timeout(Duration::from_millis(100)),
            Ok(Err(_)) | Err(_)
        ) {
            break;
        }
    }
    acked
}

/// Numbered JSON payloads `{"n": i}` for i in range.
pub fn numbered(range: std::ops::Range<u64>) -> Vec<Vec<u8>> {
    range
        .map(|i| format!("{{\"n\":{i}}}").into_bytes())
        .collect()
}
