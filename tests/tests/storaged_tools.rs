//! Unmodified NBD tools against a running storaged: qemu-img, qemu-io, nbdinfo, nbdcopy, fio;
//! maps of data and holes, and copies that read only the data.

use anyhow::{Context, Result};
use e2e::process::run_ok;
use e2e::storaged::{client_config, Storaged};
use std::process::Command;
use storaged_client::nbd::Client;
use storaged_client::protocol::RequestedState;

fn tool_output(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8(run_ok(cmd)?.stdout)?)
}

#[test]
fn qemu_img_info_and_convert_to_and_from_a_volume() -> Result<()> {
    let (dir, s) = Storaged::start_with_volume(
        "disk",
        "64M",
        &["--anonymous", "read-write-without-primary"],
    )?;
    let info = tool_output(Command::new("qemu-img").args(["info", &s.uri("disk")]))?;
    assert!(info.contains("virtual size: 64 MiB"), "{info}");

    let src = dir.path().join("src.raw");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(&src, &data)?;
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(s.uri("disk")),
    )?;
    let back = dir.path().join("back.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &s.uri("disk")])
            .arg(&back),
    )?;
    let got = std::fs::read(&back)?;
    assert_eq!(got.len(), 64 << 20);
    assert!(
        got[..data.len()] == data[..],
        "data differs after the round trip"
    );
    assert!(got[data.len()..].iter().all(|&b| b == 0));
    Ok(())
}

#[test]
fn qemu_io_patterns_verify_across_connections() -> Result<()> {
    let (_dir, s) =
        Storaged::start_with_volume("io", "32M", &["--anonymous", "read-write-without-primary"])?;
    let uri = s.uri("io");
    let out = tool_output(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "write -P 0xc3 4M 64k",
        "-c",
        "write -P 0x11 31M 1M",
        "-c",
        "write -z 8M 2M",
        "-c",
        "write -P 0x77 16M 4k",
        "-c",
        "discard 16M 4k",
        "-c",
        "flush",
        &uri,
    ]))?;
    assert!(!out.contains("failed"), "{out}");
    // A second connection sees everything the first wrote.
    let out = tool_output(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "read -P 0xc3 4M 64k",
        "-c",
        "read -P 0x11 31M 1M",
        "-c",
        "read -P 0 8M 2M",
        "-c",
        "read -P 0 16M 4k",
        "-c",
        "read -P 0 1M 3M",
        &uri,
    ]))?;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 6, "{out}");
    // Reads beyond the end are refused by the client already; a wrong pattern is detected.
    let bad = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x5b 0 4k", &uri])
        .output()?;
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.contains("Pattern verification failed"), "{text}");
    Ok(())
}

#[test]
fn nbdinfo_reports_size_limits_and_exports() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Storaged::start(dir.path())?;
    s.create_volume("a", "16M", &[])?;
    s.create_volume("b", "1G", &[])?;
    let json = tool_output(Command::new("nbdinfo").args(["--json", &s.uri("b")]))?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 1u64 << 30);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    // Anonymous clients of a default volume are read-only.
    assert_eq!(e["is_read_only"], true, "{json}");
    let list = tool_output(Command::new("nbdinfo").args(["--list", &format!("nbd://{}", s.nbd)]))?;
    assert!(
        list.contains("export=\"a\"") && list.contains("export=\"b\""),
        "{list}"
    );
    Ok(())
}

#[test]
fn fio_nbd_engine_writes_and_verifies() -> Result<()> {
    let (dir, s) =
        Storaged::start_with_volume("fio", "64M", &["--anonymous", "read-write-without-primary"])?;
    // fio leaves its verify state file in the working directory: keep it in the temp dir.
    let out = tool_output(Command::new("fio").current_dir(dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", s.uri("fio")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--output-format=json",
    ]))?;
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').context("fio json")?..])?;
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    assert_eq!(job["write"]["io_bytes"], 16u64 << 20);
    assert_eq!(
        job["read"]["io_bytes"],
        16u64 << 20,
        "verify pass must read it all back"
    );
    Ok(())
}

#[test]
fn anonymous_access_ends_when_a_primary_exists() -> Result<()> {
    let (_dir, s) = Storaged::start_with_volume("p", "16M", &[])?;
    let uri = s.uri("p");
    run_ok(Command::new("nbdinfo").arg(&uri))?;
    // Read-only: an anonymous write fails.
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k", &uri])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&w.stdout),
        String::from_utf8_lossy(&w.stderr)
    );
    assert!(
        !w.status.success() || text.contains("failed") || text.contains("read-only"),
        "{text}"
    );

    let rt = tokio::runtime::Runtime::new()?;
    let primary = rt.block_on(Client::connect(&client_config(
        &s,
        "p",
        "host-a",
        RequestedState::Primary,
    )))?;
    assert_eq!(primary.lease().map(|l| l.0), Some(RequestedState::Primary));
    let refused = Command::new("nbdinfo")
        .arg(&uri)
        .env("LIBNBD_DEBUG", "1")
        .output()?;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("primary lease exists"), "{err}");
    Ok(())
}

/// A storaged with a 1 GiB volume "sparse" holding 1 MiB of data at 1 MiB and 64 KiB at
/// 512 MiB.
fn sparse_volume() -> Result<(tempfile::TempDir, Storaged)> {
    let (dir, s) = Storaged::start_with_volume(
        "sparse",
        "1G",
        &["--anonymous", "read-write-without-primary"],
    )?;
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 1M 1M",
        "-c",
        "write -P 0x22 512M 64k",
        &s.uri("sparse"),
    ]))?;
    Ok((dir, s))
}

#[test]
fn nbdinfo_and_qemu_img_map_the_data_and_the_holes() -> Result<()> {
    let (_dir, s) = sparse_volume()?;
    let map = tool_output(Command::new("nbdinfo").args(["--map", &s.uri("sparse")]))?;
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let expected = [
        ["0", "1048576", "3", "hole,zero"],
        ["1048576", "1048576", "0", "data"],
        ["2097152", "534773760", "3", "hole,zero"],
        ["536870912", "65536", "0", "data"],
        ["536936448", "536805376", "3", "hole,zero"],
    ];
    assert_eq!(rows, expected, "{map}");
    let json = tool_output(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "raw",
        &s.uri("sparse"),
    ]))?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let data: Vec<(u64, u64)> = v
        .as_array()
        .context("qemu-img map")?
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| {
            Ok((
                e["start"].as_u64().context("start")?,
                e["length"].as_u64().context("length")?,
            ))
        })
        .collect::<Result<_>>()?;
    assert_eq!(data, [(1 << 20, 1 << 20), (512 << 20, 64 << 10)], "{json}");
    Ok(())
}

#[test]
fn sparse_copies_read_only_the_data() -> Result<()> {
    let (dir, s) = sparse_volume()?;
    // Each copy of the 1 GiB volume may read its 1 MiB + 64 KiB of data and the requests, not
    // the holes.
    let limit = 64u64 << 20;
    for (tool, out) in [("qemu-img", "qemu.raw"), ("nbdcopy", "nbdcopy.raw")] {
        let dest = dir.path().join(out);
        let before = s.read_bytes()?;
        let mut cmd = Command::new(tool);
        match tool {
            "qemu-img" => cmd.args(["convert", "-f", "raw", "-O", "raw", &s.uri("sparse")]),
            _ => cmd.args([&s.uri("sparse")]),
        };
        run_ok(cmd.arg(&dest))?;
        let read = s.read_bytes()? - before;
        assert!(read < limit, "{tool} made storaged read {read} bytes");
        let copy = std::fs::read(&dest)?;
        assert_eq!(copy.len(), 1 << 30);
        assert!(copy[1 << 20..2 << 20].iter().all(|&b| b == 0x11), "{tool}");
        assert!(copy[512 << 20..(512 << 20) + (64 << 10)]
            .iter()
            .all(|&b| b == 0x22));
        assert_eq!(
            copy.iter().filter(|&&b| b != 0).count(),
            (1 << 20) + (64 << 10)
        );
        // The copies are sparse themselves.
        let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&dest)?) * 512;
        assert!(allocated < limit, "{tool} wrote {allocated} bytes");
    }
    Ok(())
}
