//! The real binary as a daemon: ships what appears, serves readiness and metrics, stops on
//! SIGTERM.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::{Tree, MANUAL};

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// Kills the daemon if the test fails before stopping it.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_daemon_ships_new_and_grown_logs_and_stops_cleanly() {
    let tree = Tree::new();
    let old = format!("{MANUAL}/task_id=old/attempt=1.log");
    tree.write(&old, b"before start\n");
    let addr = free_port();
    let addr_arg = addr.to_string();
    let log = tree.dir.path().join("daemon.log");
    let mut daemon = Daemon(
        tree.command(&[
            "--settle",
            "1s",
            "--rescan",
            "1h",
            "--metrics-addr",
            &addr_arg,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );

    wait_for("readiness", || {
        get(addr, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    });
    wait_for("the old log", || tree.out().join(&old).exists());

    // Written after start: found by the watch, not a rescan (which is an hour away).
    let new = format!("{MANUAL}/task_id=new/attempt=1.log");
    tree.write(&new, b"first line\n");
    wait_for("the new log", || {
        std::fs::read(tree.out().join(&new)).is_ok_and(|b| b == b"first line\n")
    });
    tree.append(&new, b"second line\n");
    wait_for("the grown log", || {
        std::fs::read(tree.out().join(&new)).is_ok_and(|b| b == b"first line\nsecond line\n")
    });

    // The object is in place a moment before the shipment is counted, and the backlog gauge
    // is refreshed every few seconds.
    wait_for("the shipments in the metrics", || {
        get(addr, "/metrics").is_some_and(|m| {
            m.contains("localship_logshipper_files_shipped_total{kind=\"task\"} 3")
                && m.contains("localship_logshipper_bytes_shipped_total 47")
                && m.contains("localship_logshipper_backlog_files 0")
        })
    });
    assert!(get(addr, "/healthz").unwrap().starts_with("HTTP/1.1 200"));

    kill(Pid::from_raw(daemon.0.id() as i32), Signal::SIGTERM).unwrap();
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "{status}");
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(stderr.contains("stopped"), "{stderr}");
}
