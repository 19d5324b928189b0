//! storaged as clients nobody here wrote use it: libnbd (through its Python binding, the
//! library behind nbdinfo and nbdcopy) negotiates structured replies and expects every reply
//! to a read to be structured, errors included; it lists and selects `base:allocation`, asks
//! for block status, the export's name and description, the default export, CACHE and
//! FAST_ZERO.

use anyhow::{ensure, Result};
use e2e::process::run_ok;
use e2e::storaged::Storaged;
use std::process::Command;

/// Runs a Python script with libnbd's binding against `uri`; returns its stdout.
fn libnbd(uri: &str, script: &str) -> Result<String> {
    python(&format!(
        "h = nbd.NBD()\nh.set_strict_mode(0)\nh.connect_uri({uri:?})\n{script}"
    ))
}

/// Runs a Python script with libnbd's binding imported; returns its stdout.
fn python(script: &str) -> Result<String> {
    let script = format!("import nbd, errno\n{script}");
    let out = run_ok(Command::new("/usr/bin/python3").args(["-c", &script]))?;
    Ok(String::from_utf8(out.stdout)?)
}

/// A storaged with a 64 MiB volume "v" holding data at 1 MiB (1 MiB) and at 10 MiB (64 KiB).
fn volume_with_data() -> Result<(tempfile::TempDir, Storaged)> {
    let (dir, s) = Storaged::start_with_volume(
        "v",
        "64M",
        &[
            "--anonymous",
            "read-write-without-primary",
            "--description",
            "the data disk",
        ],
    )?;
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 1 1M 1M",
        "-c",
        "write -P 2 10M 64k",
        &s.uri("v"),
    ]))?;
    Ok((dir, s))
}

#[test]
fn block_status_reports_data_and_holes_in_base_allocation() -> Result<()> {
    let (_dir, s) = volume_with_data()?;
    let out = python(&format!(
        r#"
def ctx(label):
    def cb(name):
        print(label, name)
        return 0
    return cb
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri({uri:?})
print("all", h.opt_list_meta_context(ctx("ctx")))
h.add_meta_context("base:")
print("namespace", h.opt_list_meta_context(ctx("ns")))
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:nope")
h.opt_go()
print("can", h.can_meta_context("base:allocation"), h.can_meta_context("qemu:dirty-bitmap:nope"))
def show(ctx, offset, entries, err):
    print("status", ctx, offset, entries)
    return 0
h.block_status(64 << 20, 0, show)
h.block_status(8 << 20, 1 << 20, show, flags=nbd.CMD_FLAG_REQ_ONE)
try:
    h.block_status(1 << 20, 64 << 20, show)
except nbd.Error as e:
    print("past the end", errno.errorcode.get(e.errno, e.errno))
print("still", len(h.pread(4096, 1 << 20)))
"#,
        uri = s.uri("v")
    ))?;
    ensure!(
        out.contains("all 1") && out.contains("ctx base:allocation"),
        "{out}"
    );
    ensure!(
        out.contains("namespace 1") && out.contains("ns base:allocation"),
        "{out}"
    );
    ensure!(out.contains("can True False"), "{out}");
    // Hole+zero (3) and data (0) alternate; the last hole runs to the end.
    let map = [
        1 << 20,
        3,
        1 << 20,
        0,
        8 << 20,
        3,
        64 << 10,
        0,
        (54 << 20) - (64 << 10),
        3,
    ];
    let expected = format!("status base:allocation 0 {map:?}");
    ensure!(out.contains(&expected), "{out}\nwanted {expected}");
    ensure!(
        out.contains("status base:allocation 1048576 [1048576, 0]"),
        "{out}"
    );
    ensure!(out.contains("past the end EINVAL"), "{out}");
    ensure!(out.contains("still 4096"), "{out}");
    Ok(())
}

#[test]
fn name_description_default_export_cache_and_fast_zero() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Storaged::start_with(dir.path(), &["--default-export", "v"])?;
    s.create_volume(
        "v",
        "16M",
        &[
            "--anonymous",
            "read-write-without-primary",
            "--description",
            "the data disk",
        ],
    )?;
    // No export name: the default export, with its real name and description.
    let out = python(&format!(
        r#"
h = nbd.NBD()
h.set_full_info(True)
h.connect_uri({uri:?})
print("size", h.get_size())
print("name", h.get_canonical_export_name())
print("description", h.get_export_description())
print("cache", h.can_cache(), "fast zero", h.can_fast_zero(), "df", h.can_df())
h.pwrite(b"\x07" * 65536, 0)
h.cache(1 << 20, 0)
h.zero(65536, 0, flags=nbd.CMD_FLAG_FAST_ZERO)
h.zero(4096, 8192, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
print("zeroed", h.pread(65536, 0) == bytes(65536))
chunks = []
def chunk(buf, offset, status, err):
    chunks.append(len(buf))
    return 0
h.pread_structured(65536, 0, chunk, flags=nbd.CMD_FLAG_DF)
print("df chunks", chunks)
"#,
        uri = format!("nbd://{}", s.nbd)
    ))?;
    ensure!(out.contains("size 16777216"), "{out}");
    ensure!(out.contains("name v\n"), "{out}");
    ensure!(out.contains("description the data disk"), "{out}");
    ensure!(out.contains("cache True fast zero True df True"), "{out}");
    ensure!(out.contains("zeroed True"), "{out}");
    ensure!(out.contains("df chunks [65536]"), "{out}");
    // Unmodified tools without an export name get the default one too.
    let info = String::from_utf8(
        run_ok(Command::new("qemu-img").args(["info", &format!("nbd://{}", s.nbd)]))?.stdout,
    )?;
    ensure!(info.contains("virtual size: 16 MiB"), "{info}");
    Ok(())
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

#[test]
fn long_reads_arrive_whole_with_and_without_structured_replies() -> Result<()> {
    // Reads of data, of holes and of both, one at a time and several in flight.
    let (_dir, s) = volume_with_data()?;
    for structured in ["True", "False"] {
        let out = python(&format!(
            r#"
h = nbd.NBD()
h.set_request_structured_replies({structured})
h.connect_uri({uri:?})
print("structured", h.get_structured_replies_negotiated())
# The volume's first 4 MiB: a hole, 1 MiB of data, a hole.
disk = bytes(1 << 20) + b"\x01" * (1 << 20) + bytes(2 << 20)
def want(offset, length):
    return disk[offset:offset + length]
print("one", h.pread(1 << 20, 1 << 20) == want(1 << 20, 1 << 20))
span = (1 << 20) - (64 << 10)
print("span", h.pread(3 << 20, span) == want(span, 3 << 20))
print("tail", h.pread(64 << 10, 10 << 20) == b"\x02" * (64 << 10))
# Several in flight at once: their replies may come in any order, each whole.
at = [(1 << 20) + i * (128 << 10) for i in range(8)]
bufs = [nbd.Buffer(256 << 10) for _ in at]
cookies = [h.aio_pread(b, o) for b, o in zip(bufs, at)]
while h.aio_in_flight() > 0:
    h.poll(-1)
print("completed", all(h.aio_command_completed(c) for c in cookies))
print("aio", all(b.to_bytearray() == want(o, 256 << 10) for b, o in zip(bufs, at)))
"#,
            uri = s.uri("v")
        ))?;
        ensure!(out.contains(&format!("structured {structured}")), "{out}");
        for what in ["one", "span", "tail", "completed", "aio"] {
            ensure!(out.contains(&format!("{what} True")), "{structured}: {out}");
        }
    }
    Ok(())
}
