//! Records when this binary was built (`FERRY_BUILD_UNIX`, seconds since the epoch): a wall clock
//! earlier than that is never trusted (`src/clock.rs`). `SOURCE_DATE_EPOCH` sets it for
//! reproducible builds; otherwise it is the time of the first build of this checkout (the script
//! runs again only when that variable changes), which is no later than the build.
fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    println!("cargo:rustc-env=FERRY_BUILD_UNIX={secs}");
}
