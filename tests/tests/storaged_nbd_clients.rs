//! storaged as clients nobody here wrote use it: libnbd (through its Python binding, the
//! library behind nbdinfo and nbdcopy) negotiates structured replies and expects every reply
//! to a read to be structured, errors included.

use anyhow::{ensure, Result};
use e2e::process::run_ok;
use e2e::storaged::Storaged;
use std::process::Command;

/// Runs a Python script with libnbd's binding against `uri`; returns its stdout.
fn libnbd(uri: &str, script: &str) -> Result<String> {
    let prelude =
        format!("import nbd, errno\nh = nbd.NBD()\nh.set_strict_mode(0)\nh.connect_uri({uri:?})\n");
    let out = run_ok(Command::new("/usr/bin/python3").args(["-c", &(prelude + script)]))?;
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn read_errors_are_structured_replies_when_structured_replies_were_negotiated() -> Result<()> {
    let (_dir, s) = Storaged::start_with_volume("v", "1M", &[])?;
    // A read past the end (libnbd's own bounds check is off) must come back as EINVAL, on a
    // connection that stays usable.
    let out = libnbd(
        &s.uri("v"),
        r#"
assert h.can_meta_context("base:allocation") in (True, False)
print("structured", h.get_structured_replies_negotiated())
try:
    h.pread(4096, 1 << 20)
    print("read past the end succeeded")
except nbd.Error as e:
    print("errno", e.errno, e.string)
print("after", len(h.pread(4096, 0)))
"#,
    )?;
    ensure!(out.contains("structured True"), "{out}");
    ensure!(out.contains("errno EINVAL"), "{out}");
    ensure!(out.contains("after 4096"), "{out}");
    Ok(())
}
