//! migrated on its own: it starts, reports itself and its peers, answers bad input with clear
//! errors without falling over, refuses a guest whose VMM cannot start (and says why), and
//! stops on SIGTERM; with a cluster token its TCP API refuses requests that lack it. No guest
//! boots here.

use e2e::migrated::{Migrated, MigratedOptions};
use e2e::write_token;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

fn raw_http(socket: &std::path::Path, req: &str) -> (u16, String) {
    exchange(UnixStream::connect(socket).unwrap(), req)
}

fn exchange(mut s: impl Read + Write, req: &str) -> (u16, String) {
    s.write_all(req.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, body.to_string())
}

#[test]
fn migrated_serves_its_api_and_cli_and_survives_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = MigratedOptions::without_storaged("host-a");
    // A peer nobody listens on.
    opts.peers.push(("host-b".into(), "127.0.0.1:9".into()));
    let mut m = Migrated::start(dir.path(), opts).unwrap();

    let hosts = m.ctl(&["hosts"]).unwrap();
    let hosts = hosts.as_array().unwrap();
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    assert_eq!(hosts[0]["host_id"], "host-a");
    assert_eq!(hosts[0]["local"], true);
    assert_eq!(hosts[1]["host_id"], "host-b");
    assert_eq!(hosts[1]["reachable"], false);
    assert!(hosts[1]["error"].as_str().unwrap().contains("127.0.0.1:9"));
    // Text output too.
    let out = m.ctl_raw(&["hosts"]).unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("host-b") && text.contains("unreachable"),
        "{text}"
    );

    assert_eq!(m.ctl(&["instances"]).unwrap(), serde_json::json!([]));
    assert_eq!(m.ctl(&["migrations"]).unwrap(), serde_json::json!([]));

    // The same API over TCP, as peers and `--host` use it.
    let out = std::process::Command::new(e2e::binary("migratectl"))
        .args(["--host", &m.listen, "--json", "hosts"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let remote: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(remote[0]["host_id"], "host-a");

    // Bad input: clear errors, non-zero exit, the daemon keeps serving.
    for (args, needle) in [
        (vec!["stop", "nope"], "instance nope not found"),
        (vec!["show", "nope"], "instance nope not found"),
        (
            vec!["migrate", "nope", "--to", "host-b"],
            "instance nope not found",
        ),
        (vec!["migrations", "x"], "migration x not found"),
    ] {
        let out = m.ctl_raw(&args).unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "name = 'vm1'\nkernel = '/k'\nvcpus = 0\n").unwrap();
    let out = m.ctl_raw(&["run", bad_toml.to_str().unwrap()]).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vcpus must be"),
        "{out:?}"
    );
    for req in [
        "POST /v1/instances HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{nope",
        "POST /v1/instances HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]",
        "POST /v1/incoming HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        "POST /v1/instances/..%2F..%2Fetc/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ] {
        let (code, body) = raw_http(&m.socket, req);
        assert!((400..500).contains(&code), "{req:?} -> {code} {body}");
        assert!(body.contains("error"), "{body}");
    }
    let (code, body) = raw_http(
        &m.socket,
        "GET /v1/host HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"host_id\":\"host-a\""), "{body}");
    assert!(m.is_running());

    // SIGTERM: clean exit, socket removed; a restart on the same state serves again.
    let status = m.terminate().unwrap();
    assert!(status.success(), "{status}");
    assert!(!m.socket.exists());
    m.start_again().unwrap();
    assert_eq!(m.ctl(&["instances"]).unwrap(), serde_json::json!([]));
    assert!(m.log().contains("migrated serving"));
}

#[test]
fn migrated_reports_a_vmm_that_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let m = Migrated::start(dir.path(), MigratedOptions::without_storaged("host-a")).unwrap();
    let guest = dir.path().join("vm.toml");
    std::fs::write(
        &guest,
        "name = 'vm1'\nkernel = '/nonexistent/vmlinux'\nmemory_mib = 64\n",
    )
    .unwrap();
    let out = m.ctl_raw(&["run", guest.to_str().unwrap()]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the VMM exited"), "{err}");
    assert!(
        err.contains("/nonexistent/vmlinux"),
        "the VMM's own message: {err}"
    );
    let rec = m.instance("vm1").unwrap();
    assert_eq!(rec["state"], "failed", "{rec}");
    assert!(m.vmm_pids().is_empty());
    // A failed instance does not block a new attempt under the same name.
    let out = m.ctl_raw(&["run", guest.to_str().unwrap()]).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("the VMM exited"));
    assert!(m.log().contains("instance vm1 is Failed"), "{}", m.log());
}

#[test]
fn migrated_tcp_api_takes_only_requests_with_the_cluster_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path(), "e2e-cluster-secret-0123456789").unwrap();
    let with_token = |host: &str, peers: Vec<(String, String)>| {
        let mut o = MigratedOptions::without_storaged(host);
        o.token_file = Some(token.clone());
        o.peers = peers;
        o
    };
    let b = Migrated::start(&dir.path().join("b"), with_token("host-b", vec![])).unwrap();
    let a = Migrated::start(
        &dir.path().join("a"),
        with_token("host-a", vec![("host-b".into(), b.listen.clone())]),
    )
    .unwrap();

    // Peers that share the token reach each other; the local socket needs none.
    let hosts = a.ctl(&["hosts"]).unwrap();
    assert_eq!(hosts[1]["host_id"], "host-b");
    assert_eq!(hosts[1]["reachable"], true, "{hosts}");

    // Over TCP: no token or a wrong one is refused with 401 and a clear reason.
    let get = |auth: &str| {
        let req =
            format!("GET /v1/instances HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
        exchange(TcpStream::connect(&a.listen).unwrap(), &req)
    };
    let (code, body) = get("");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("missing bearer token"), "{body}");
    let (code, body) = get("Authorization: Bearer e2e-cluster-secret-0123456780\r\n");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("wrong bearer token"), "{body}");
    let (code, body) = get("Authorization: Bearer e2e-cluster-secret-0123456789\r\n");
    assert_eq!(code, 200, "{body}");
    assert!(a.log().contains("request refused"), "{}", a.log());

    // migratectl --host: refused without the token file, served with it.
    let ctl = |extra: &[&str]| {
        std::process::Command::new(e2e::binary("migratectl"))
            .args(["--host", &a.listen])
            .args(extra)
            .args(["--json", "instances"])
            .output()
            .unwrap()
    };
    let out = ctl(&[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing bearer token"),
        "{out:?}"
    );
    let out = ctl(&["--token-file", token.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );

    // A token file that cannot serve is refused at start, with the reason.
    let short = dir.path().join("short.token");
    std::fs::write(&short, "abc\n").unwrap();
    let out = std::process::Command::new(e2e::binary("migrated"))
        .args(["--host-id", "host-c", "--listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(dir.path().join("c"))
        .arg("--socket")
        .arg(dir.path().join("c.sock"))
        .arg("--token-file")
        .arg(&short)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds 3 characters"), "{err}");
}
