//! The few Sparkplug B payloads ferry writes: the rebirth request (an NCMD with the boolean
//! metric `Node Control/Rebirth`), and, for tests, any payload of named or aliased metrics.

/// A protobuf message being written.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.push(b);
                return;
            }
            self.buf.push(b | 0x80);
        }
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint((u64::from(field) << 3) | u64::from(wire));
    }

    pub fn uint(&mut self, field: u32, v: u64) -> &mut Self {
        self.key(field, 0);
        self.varint(v);
        self
    }

    pub fn bytes(&mut self, field: u32, b: &[u8]) -> &mut Self {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
        self
    }

    pub fn double(&mut self, field: u32, v: f64) -> &mut Self {
        self.key(field, 1);
        self.buf.extend_from_slice(&v.to_bits().to_le_bytes());
        self
    }

    pub fn float(&mut self, field: u32, v: f32) -> &mut Self {
        self.key(field, 5);
        self.buf.extend_from_slice(&v.to_bits().to_le_bytes());
        self
    }
}

/// Sparkplug's Boolean datatype.
const BOOLEAN: u64 = 11;

/// The NCMD payload that asks an edge node to publish its births again.
pub fn rebirth_request(timestamp_ms: u64) -> Vec<u8> {
    let mut metric = Writer::default();
    metric
        .bytes(1, b"Node Control/Rebirth")
        .uint(3, timestamp_ms)
        .uint(4, BOOLEAN)
        .uint(14, 1);
    let mut payload = Writer::default();
    payload.uint(1, timestamp_ms).bytes(2, &metric.buf);
    payload.buf
}
