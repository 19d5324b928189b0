//! Pause and resume through the API while the guest's memory workload runs: the guest is
//! silent while paused, and afterwards the sequence continues with no errors.

use agent_proto::expected_checksum;
use e2e::snapshot::vm_config;
use e2e::vmm::{json_str, VmmGuest};
use e2e::workload::mem_seq_after;
use e2e::GuestTest;
use std::time::Duration;

const REPLY: Duration = Duration::from_secs(180);
const MIB: usize = 16;

fn seq_after(guest: &mut VmmGuest, after: u64) -> agent_proto::Fields {
    mem_seq_after(&mut guest.agent, after)
}

#[test]
fn vmm_pause_resume_while_memory_workload_runs() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("vmm_pause_resume_while_memory_workload_runs")
    else {
        return;
    };
    let booted = e2e::snapshot::booted(&image).unwrap();
    let mut guest = VmmGuest::restore(&vm_config(&image, dir.path()), &booted).unwrap();
    guest
        .agent
        .command(&format!("mem start {MIB}"), REPLY)
        .unwrap();
    let before = seq_after(&mut guest, 2);

    for round in 0..3 {
        let (code, body) = guest.api("POST", "/v1/vm/pause").unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(json_str(&body, "state").as_deref(), Some("paused"));
        // Idempotent.
        let (code, body) = guest.api("POST", "/v1/vm/pause").unwrap();
        assert_eq!(
            (code, json_str(&body, "state").as_deref()),
            (200, Some("paused"))
        );
        let (_, info) = guest.api("GET", "/v1/vm").unwrap();
        assert_eq!(json_str(&info, "state").as_deref(), Some("paused"));

        let (code, body) = guest.api("POST", "/v1/vm/resume").unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(json_str(&body, "state").as_deref(), Some("running"));
        let s = seq_after(&mut guest, before.num("seq").unwrap() + round + 1);
        eprintln!("round {round}: {s:?}");
    }

    // A command sent while paused is answered after the resume, not before.
    let (code, _) = guest.api("POST", "/v1/vm/pause").unwrap();
    assert_eq!(code, 200);
    let err = guest
        .agent
        .command("ping", Duration::from_secs(3))
        .expect_err("a paused guest answered");
    assert!(err.to_string().contains("no agent reply"), "{err}");
    let (code, _) = guest.api("POST", "/v1/vm/resume").unwrap();
    assert_eq!(code, 200);
    // The late reply arrives now. The agent ignores an empty line, so "sending" one just
    // collects that reply and keeps commands and replies paired.
    let late = guest.agent.command("", REPLY).unwrap();
    assert_eq!(late.words, vec!["pong"], "{late:?}");
    guest.agent.command("ping", REPLY).unwrap();

    let last = seq_after(&mut guest, before.num("seq").unwrap() + 4);
    assert_eq!(
        last.num("checksum").unwrap(),
        expected_checksum(MIB, &last.nums("seqs").unwrap()),
        "{last:?}"
    );
    eprintln!(
        "largest gap the guest saw: {} us",
        last.num("maxgap_us").unwrap()
    );
    let stopped = guest.agent.command("mem stop", REPLY).unwrap();
    assert_eq!(stopped.num("errors"), Some(0));
}
