#[allow(unused_imports)]
use super::*;

pub struct Cloud {
    pub port: u16,
    pub dir: PathBuf,
    /// `--store` (a PostgreSQL URL); `None`: the files store in `dir`.
    store: Option<String>,
    args: Vec<String>,
    child: Option<Child>,
}

impl Cloud {
    pub fn start(dir: &Path) -> Cloud {
        Self::start_with(dir, free_port(), &[])
    }

    pub fn start_with(dir: &Path, port: u16, args: &[&str]) -> Cloud {
        Self::start_store(dir, port, None, args)
    }

    /// A replica on the PostgreSQL database at `url` (its log in `dir`).
    pub fn start_postgres(dir: &Path, url: &str, args: &[&str]) -> Cloud {
        Self::start_store(dir, free_port(), Some(url), args)
    }

    fn start_store(dir: &Path, port: u16, store: Option<&str>, args: &[&str]) -> Cloud {
        let mut c = Cloud {
            port,
            dir: dir.to_path_buf(),
            store: store.map(str::to_owned),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let mut command = command(ferry_cloud());
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port));
        match &self.store {
            Some(url) => command.arg("--store").arg(url),
            None => command.arg("--data").arg(&self.dir),
        };
        let mut child = command
            .args(&self.args)
            // What tests look for in the log beyond `info`.
            .env("RUST_LOG", "info,ferry_cloud::commands=debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.dir.join("cloud.log")).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("listening on"),
            "ferry-cloud said {line:?}"
        );
        self.child = Some(child);
    }

    /// Its process id (it must be running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("ferry-cloud is running").id()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/ingest", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, "TERM");
            wait_exit(&mut c, "ferry-cloud", Duration::from_secs(10));
        }
    }

    /// SIGKILL: a replica that dies mid-request.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// What it logged since it was last started.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("cloud.log")).unwrap_or_default()
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }

    pub fn get(&self, path: &str) -> String {
        http_get(self.port, path)
    }

    /// The device's ledger; `None` while the device is unknown here (404: no upload yet) or the
    /// answer is not one, so that a wait can poll it.
    pub fn ledger(&self, device: &str) -> Option<Value> {
        let mut response = http_client(Duration::from_secs(30))
            .get(format!(
                "http://127.0.0.1:{}/v1/devices/{device}/ledger",
                self.port
            ))
            .call()
            .ok()?;
        if response.status().as_u16() != 200 {
            return None;
        }
        serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()
    }

    /// The records stored for `device`, in file order.
    pub fn records(&self, device: &str) -> Vec<Value> {
        self.get(&format!("/v1/devices/{device}/records"))
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn device(&self, device: &str) -> Option<Value> {
        let v: Value = serde_json::from_str(&self.get("/v1/devices")).unwrap();
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == device)
            .cloned()
    }

    pub fn stats(&self) -> Value {
        serde_json::from_str(&self.get("/v1/stats")).unwrap()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
