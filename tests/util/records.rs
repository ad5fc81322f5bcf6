#[allow(unused_imports)]
use super::*;

/// The `n` values of the records at the cloud, in order.
pub fn numbers(records: &[Value]) -> Vec<u64> {
    records
        .iter()
        .filter_map(|r| r["payload"]["n"].as_u64())
        .collect()
}

/// Asserts that `records` hold exactly the numbers `0..n`, each once (after dedupe by seq).
pub fn assert_exactly_once(records: &[Value], n: u64) {
    if let Err(e) = check_exactly_once(records, n) {
        panic!("{e}");
    }
}

/// Whether `records` hold exactly the numbers `0..n`, each once (after dedupe by seq); the error
/// says which are stored twice or missing.
pub fn check_exactly_once(records: &[Value], n: u64) -> Result<(), String> {
    let mut seen = std::collections::BTreeMap::new();
    let mut twice = Vec::new();
    for r in records {
        let seq = r["seq"].as_u64().unwrap();
        if let Some(k) = r["payload"]["n"].as_u64() {
            if let Some(first) = seen.insert(k, seq) {
                twice.push(format!("n={k} as seq {first} and seq {seq}"));
            }
        }
    }
    let missing: Vec<u64> = (0..n).filter(|k| !seen.contains_key(k)).collect();
    if !twice.is_empty() || !missing.is_empty() || seen.len() as u64 != n {
        return Err(format!(
            "{} messages stored twice (first: {:?}); {} missing (first: {:?}); {} distinct of {n}",
            twice.len(),
            &twice[..twice.len().min(5)],
            missing.len(),
            &missing[..missing.len().min(20)],
            seen.len()
        ));
    }
    Ok(())
}
