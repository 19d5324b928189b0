//! storaged's CLI with `--json`: the lists print the API's JSON (an empty list included), and
//! a failed command prints its error as JSON and fails.

use anyhow::{ensure, Result};
use e2e::storaged::Storaged;
use serde_json::Value;

#[test]
fn volume_and_lease_commands_print_json() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Storaged::start(dir.path())?;
    let empty: Value = serde_json::from_str(&s.cli(&["volume", "list", "--json"])?)?;
    ensure!(empty == serde_json::json!([]), "{empty}");
    s.create_volume("v1", "1M", &[])?;
    let list: Value = serde_json::from_str(&s.cli(&["--json", "volume", "list"])?)?;
    ensure!(
        list[0]["name"] == "v1" && list[0]["size"] == 1 << 20,
        "{list}"
    );
    let leases: Value = serde_json::from_str(&s.cli(&["lease", "list", "v1", "--json"])?)?;
    ensure!(
        leases["volume"] == "v1" && leases["leases"] == serde_json::json!([]),
        "{leases}"
    );

    let out = std::process::Command::new(e2e::binary("storaged"))
        .args([
            "lease",
            "list",
            "nope",
            "--json",
            "--api",
            &s.api.to_string(),
        ])
        .output()?;
    ensure!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        err["error"].as_str().unwrap_or("").contains("nope"),
        "{err}"
    );
    let deleted: Value = serde_json::from_str(&s.cli(&["volume", "delete", "v1", "--json"])?)?;
    ensure!(deleted["deleted"] == "v1", "{deleted}");
    Ok(())
}
