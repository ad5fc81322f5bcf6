use super::encode::Writer;
use super::*;

/// A metric: `name` (if any), `alias` (if any), datatype, and a value written by `value`.
fn metric(
    name: Option<&str>,
    alias: Option<u64>,
    datatype: u64,
    value: impl Fn(&mut Writer),
) -> Vec<u8> {
    let mut m = Writer::default();
    if let Some(n) = name {
        m.bytes(1, n.as_bytes());
    }
    if let Some(a) = alias {
        m.uint(2, a);
    }
    m.uint(4, datatype);
    value(&mut m);
    m.buf
}

fn payload(seq: Option<u64>, metrics: &[Vec<u8>]) -> Vec<u8> {
    let mut p = Writer::default();
    p.uint(1, 1_700_000_000_000);
    for m in metrics {
        p.bytes(2, m);
    }
    if let Some(s) = seq {
        p.uint(3, s);
    }
    p.buf
}

fn birth(seq: u64, bd_seq: u64) -> Vec<u8> {
    payload(
        Some(seq),
        &[
            metric(Some("bdSeq"), None, 8, |m| {
                m.uint(11, bd_seq);
            }),
            metric(Some("Temperature"), Some(5), 10, |m| {
                m.double(13, 21.5);
            }),
        ],
    )
}

fn data(seq: u64) -> Vec<u8> {
    payload(
        Some(seq),
        &[metric(None, Some(5), 10, |m| {
            m.double(13, 22.0);
        })],
    )
}

#[test]
fn metrics_of_every_kind_decode_faithfully() {
    let mut dataset = Writer::default();
    dataset
        .uint(1, 2)
        .bytes(2, b"a")
        .bytes(2, b"b")
        .uint(3, 3)
        .uint(3, 12);
    let mut row = Writer::default();
    let mut e1 = Writer::default();
    e1.uint(1, (-4i32) as u32 as u64);
    let mut e2 = Writer::default();
    e2.bytes(6, b"x");
    row.bytes(1, &e1.buf).bytes(1, &e2.buf);
    dataset.bytes(4, &row.buf);
    let mut props = Writer::default();
    let mut pv = Writer::default();
    pv.uint(1, 12).bytes(8, b"degC");
    props.bytes(1, b"engUnit").bytes(2, &pv.buf);
    let p = payload(
        Some(3),
        &[
            metric(Some("i8"), None, 1, |m| {
                m.uint(10, 0xff);
            }),
            metric(Some("i64"), None, 4, |m| {
                m.uint(11, (-2i64) as u64);
            }),
            metric(Some("f"), None, 9, |m| {
                m.float(12, f32::NAN);
            }),
            metric(Some("s"), None, 12, |m| {
                m.bytes(15, b"hello");
            }),
            metric(Some("b"), None, 17, |m| {
                m.bytes(16, &[1, 2, 3]);
            }),
            metric(Some("arr"), None, 23, |m| {
                m.bytes(16, &[0xfe, 0xff, 7, 0]);
            }),
            metric(Some("ds"), None, 16, |m| {
                m.bytes(17, &dataset.buf);
            }),
            metric(Some("p"), None, 11, |m| {
                m.uint(7, 1).uint(14, 1).bytes(9, &props.buf).uint(99, 42);
            }),
        ],
    );
    let v = decode::payload(&p).unwrap();
    assert_eq!(v["seq"], 3);
    assert_eq!(v["timestamp"], 1_700_000_000_000u64);
    let m = &v["metrics"];
    assert_eq!(m[0], json!({"name": "i8", "datatype": "Int8", "value": -1}));
    assert_eq!(m[1]["value"], -2);
    assert_eq!(m[2]["value"], "NaN");
    assert_eq!(m[3]["value"], "hello");
    assert_eq!(m[4]["value_b64"], "AQID");
    assert_eq!(m[5]["value"], json!([-2, 7]));
    assert_eq!(
        m[6]["value"],
        json!({"num_of_columns": 2, "columns": ["a", "b"], "types": ["Int32", "String"],
               "rows": [[-4, "x"]]})
    );
    assert_eq!(m[7]["is_null"], true);
    assert_eq!(
        m[7]["properties"]["engUnit"],
        json!({"type": "String", "value": "degC"})
    );
    assert_eq!(m[7]["unknown_fields"], json!([{"field": 99, "value": 42}]));
}

/// Garbage, truncations and deep nesting give an error, never a panic.
#[test]
fn bad_payloads_are_errors() {
    let good = birth(0, 1);
    for n in 0..good.len() {
        let _ = decode::payload(&good[..n]);
        let mut bad = good.clone();
        bad[n] ^= 0xff;
        let _ = decode::payload(&bad);
    }
    assert!(decode::payload(&[0xff; 11]).is_err());
    // Templates nested 20 deep.
    let mut inner = metric(Some("leaf"), None, 3, |m| {
        m.uint(10, 1);
    });
    for _ in 0..20 {
        let mut t = Writer::default();
        t.bytes(2, &inner);
        inner = metric(Some("t"), None, 19, |m| {
            m.bytes(18, &t.buf);
        });
    }
    let e = decode::payload(&payload(None, &[inner])).unwrap_err();
    assert!(e.to_string().contains("nested deeper"), "{e}");
}

#[test]
fn topics_parse() {
    assert_eq!(
        topic("spBv1.0/plant/DDATA/edge1/pump"),
        Some(Topic {
            group: "plant",
            kind: "DDATA",
            node: "edge1",
            device: Some("pump")
        })
    );
    assert_eq!(topic("spBv1.0/STATE/host"), None);
    assert_eq!(topic("sensors/a"), None);
    assert_eq!(topic("spBv1.0/g/NDATA/n/d/extra"), None);
}

#[test]
fn aliases_resolve_from_the_latest_birth() {
    let aliases = Aliases::default();
    let mut t = Tracker::new(aliases.clone(), None);
    let now = Instant::now();
    t.observe("spBv1.0/g/NBIRTH/n", &birth(0, 1), 1_000, now);
    let v = aliases
        .decode("spBv1.0/g/NDATA/n", &data(1), 1_000)
        .unwrap();
    assert_eq!(v["metrics"][0]["name"], "Temperature");
    let v = aliases
        .decode("spBv1.0/g/NDATA/other", &data(1), 1_000)
        .unwrap();
    assert_eq!(v["metrics"][0]["alias_unresolved"], true);
    // Data stamped before the first birth known: unresolved.
    let v = aliases.decode("spBv1.0/g/NDATA/n", &data(1), 999).unwrap();
    assert_eq!(v["metrics"][0]["alias_unresolved"], true);
}

/// A rebirth that renumbers the aliases: data journaled before it resolves by the birth before.
#[test]
fn data_resolves_by_the_birth_before_it() {
    let aliases = Aliases::default();
    let mut t = Tracker::new(aliases.clone(), None);
    let now = Instant::now();
    t.observe("spBv1.0/g/NBIRTH/n", &birth(0, 1), 100, now);
    let renumbered = payload(
        Some(0),
        &[metric(Some("Pressure"), Some(5), 3, |m| {
            m.uint(10, 7);
        })],
    );
    t.observe("spBv1.0/g/NBIRTH/n", &renumbered, 200, now);
    let name = |ts| {
        aliases.decode("spBv1.0/g/NDATA/n", &data(1), ts).unwrap()["metrics"][0]["name"].clone()
    };
    assert_eq!(name(150), "Temperature");
    assert_eq!(name(250), "Pressure");
}

#[test]
fn upstream_gaps_are_found_and_repeats_are_not() {
    let mut t = Tracker::new(Aliases::default(), None);
    let now = Instant::now();
    let n = "spBv1.0/g/NDATA/n";
    assert_eq!(
        t.observe("spBv1.0/g/NBIRTH/n", &birth(254, 7), 1_000, now),
        Observed::default()
    );
    assert!(t.observe(n, &data(255), 1_000, now).gap.is_none());
    // Wraps to 0.
    assert!(t.observe(n, &data(0), 1_000, now).gap.is_none());
    let gap = t.observe(n, &data(3), 1_000, now).gap.unwrap();
    assert_eq!(gap["kind"], "seq");
    assert_eq!(gap["missing"], 2);
    assert_eq!(gap["missing_seqs"], "1..=2");
    assert_eq!(gap["edge_node"], "n");
    // A redelivery of seq 3, or of an older one: not a gap.
    assert!(t.observe(n, &data(3), 1_000, now).gap.is_none());
    assert!(t.observe(n, &data(0), 1_000, now).gap.is_none());
    assert!(t.observe(n, &data(4), 1_000, now).gap.is_none());
    // Data from a node never seen born.
    let gap = t
        .observe("spBv1.0/g/DDATA/m/d", &data(9), 1_000, now)
        .gap
        .unwrap();
    assert_eq!(gap["kind"], "no_birth_seen");
    assert_eq!(gap["since_start"], true);
    assert!(
        t.observe("spBv1.0/g/DDATA/m/d", &data(10), 1_000, now)
            .gap
            .is_none()
    );
    // A death from another session.
    let mut death = Writer::default();
    death.bytes(
        2,
        &metric(Some("bdSeq"), None, 8, |m| {
            m.uint(11, 6);
        }),
    );
    let gap = t
        .observe("spBv1.0/g/NDEATH/n", &death.buf, 1_000, now)
        .gap
        .unwrap();
    assert_eq!(gap["kind"], "bd_seq_mismatch");
    assert_eq!(gap["birth_bd_seq"], 7);
    // Its own death: the node is offline, its next data comes before a birth.
    let mut death = Writer::default();
    death.bytes(
        2,
        &metric(Some("bdSeq"), None, 8, |m| {
            m.uint(11, 7);
        }),
    );
    assert!(
        t.observe("spBv1.0/g/NDEATH/n", &death.buf, 1_000, now)
            .gap
            .is_none()
    );
    let gap = t.observe(n, &data(5), 1_000, now).gap.unwrap();
    assert_eq!(
        (gap["kind"].as_str(), gap["since_start"].as_bool()),
        (Some("no_birth_seen"), Some(false))
    );
    // Not Sparkplug, or not decodable: not followed.
    assert_eq!(
        t.observe("sensors/a", b"{}", 1_000, now),
        Observed::default()
    );
    assert_eq!(t.observe(n, &[0xff; 3], 1_000, now), Observed::default());
}

#[test]
fn a_rebirth_is_asked_at_most_once_per_period() {
    let mut t = Tracker::new(Aliases::default(), Some(Duration::from_secs(60)));
    let now = Instant::now();
    t.observe("spBv1.0/g/NBIRTH/n", &birth(0, 1), 1_000, now);
    let first = t.observe("spBv1.0/g/NDATA/n", &data(5), 1_000, now);
    let (topic_name, body) = first.rebirth.unwrap();
    assert_eq!(topic_name, "spBv1.0/g/NCMD/n");
    let v = decode::payload(&body).unwrap();
    assert_eq!(v["metrics"][0]["name"], "Node Control/Rebirth");
    assert_eq!(v["metrics"][0]["value"], true);
    let second = t.observe(
        "spBv1.0/g/NDATA/n",
        &data(9),
        1_000,
        now + Duration::from_secs(10),
    );
    assert!(second.gap.is_some() && second.rebirth.is_none());
    let third = t.observe(
        "spBv1.0/g/NDATA/n",
        &data(20),
        1_000,
        now + Duration::from_secs(61),
    );
    assert!(third.rebirth.is_some());
}

/// Followed again from the journal after a restart: a message lost while ferry was down is a
/// gap of exactly the seqs missing (not an unknown), replayed messages report nothing and ask no
/// rebirth, the births replayed resolve aliases, and a node whose birth the replay did not hold
/// is asked to rebirth (its aliases are unknown) without a gap.
#[test]
fn a_tracker_resumed_from_the_journal_finds_what_was_lost_while_ferry_was_down() {
    let aliases = Aliases::default();
    let mut t = Tracker::new(aliases.clone(), Some(Duration::from_secs(60)));
    let now = Instant::now();
    t.replay("spBv1.0/g/NBIRTH/n", &birth(0, 1), 1_000);
    t.replay("spBv1.0/g/NDATA/n", &data(1), 1_001);
    t.replay("spBv1.0/g/NDATA/n", &data(3), 1_002); // a gap found before the restart
    t.replay("spBv1.0/g/NDATA/other", &data(40), 1_003); // its birth is older than the replay
    assert_eq!(t.nodes(), 2);
    let v = aliases
        .decode("spBv1.0/g/NDATA/n", &data(4), 1_002)
        .unwrap();
    assert_eq!(v["metrics"][0]["name"], "Temperature");

    // Seqs 4 and 5 were dropped by the broker while ferry was down.
    let live = t.observe("spBv1.0/g/NDATA/n", &data(6), 2_000, now);
    let gap = live.gap.expect("a gap");
    assert_eq!(
        (&gap["kind"], &gap["missing"], &gap["missing_seqs"]),
        (&json!("seq"), &json!(2), &json!("4..=5")),
        "{gap}"
    );
    assert!(live.rebirth.is_some(), "a gap asks for a rebirth");
    // In sequence after the replay: nothing to say, no rebirth (its birth was replayed).
    let mut t2 = Tracker::new(Aliases::default(), Some(Duration::from_secs(60)));
    t2.replay("spBv1.0/g/NBIRTH/n", &birth(0, 1), 1_000);
    t2.replay("spBv1.0/g/NDATA/n", &data(1), 1_001);
    assert_eq!(
        t2.observe("spBv1.0/g/NDATA/n", &data(2), 2_000, now),
        Observed::default()
    );
    // The other node: in sequence, so no gap, but asked for the birth its aliases need.
    let other = t.observe("spBv1.0/g/NDATA/other", &data(41), 2_000, now);
    assert!(other.gap.is_none(), "{:?}", other.gap);
    assert!(other.rebirth.is_some());
}
