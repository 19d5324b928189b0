//! Test hosts as network namespaces joined by veth pairs to a bridge in a switch namespace.
//!
//! Addresses come from 198.18.0.0/15 (RFC 2544, set aside for network benchmarks), so nothing a
//! test sends can be mistaken for, or reach, a real network: the namespaces have no route out.
//! Everything is removed on drop.

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A set of namespaces on one bridge; removed on drop.
pub struct Rig {
    prefix: String,
    switch: String,
    hosts: Vec<Host>,
    /// The third byte of the rig's addresses.
    subnet: u8,
    /// This process's end of the link of [`Rig::reach_from_here`], once made.
    gateway: Option<String>,
}

/// One test host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name given by the test ("storage", "a", "b").
    pub name: String,
    /// Namespace name.
    pub netns: String,
    /// Address on the rig's network.
    pub addr: std::net::Ipv4Addr,
    /// The host's end of its veth pair.
    pub iface: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

static RIGS: AtomicU32 = AtomicU32::new(0);

impl Rig {
    /// Creates one namespace per name, each with an address on a shared bridge.
    pub fn new(names: &[&str]) -> Result<Rig> {
        let id = std::process::id() % 100_000;
        let n = RIGS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("vh{id}x{n}");
        let switch = format!("{prefix}-sw");
        // Rigs of concurrent test processes get different subnets, so that the link of
        // [`Rig::reach_from_here`] (whose route is in the shared namespace) names one rig only.
        let subnet = ((id + n) % 250) as u8;
        let mut rig = Rig {
            prefix: prefix.clone(),
            switch: switch.clone(),
            hosts: Vec::new(),
            subnet,
            gateway: None,
        };
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for (i, name) in names.iter().enumerate() {
            let netns = format!("{prefix}-{name}");
            ip(&["netns", "add", &netns])?;
            let addr = std::net::Ipv4Addr::new(198, 18, subnet, 10 + i as u8);
            // Interface names are limited to 15 bytes: keep them short and unique per rig.
            let (inner, outer) = (format!("v{n}h{i}"), format!("v{n}s{i}"));
            rig.hosts.push(Host {
                name: name.to_string(),
                netns: netns.clone(),
                addr,
                iface: inner.clone(),
            });
            ip(&[
                "-n", &netns, "link", "add", &inner, "type", "veth", "peer", "name", &outer,
                "netns", &switch,
            ])?;
            ip(&["-n", &switch, "link", "set", &outer, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &inner,
            ])?;
            ip(&["-n", &netns, "link", "set", &inner, "up"])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        }
        Ok(rig)
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Namespace name prefix of this rig.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Joins the namespace this process runs in to the rig's bridge (address 198.18.X.1), so
    /// that the test itself reaches every host (a client of daemons running in the hosts).
    /// The link goes with the rig.
    pub fn reach_from_here(&mut self) -> Result<std::net::Ipv4Addr> {
        let addr = std::net::Ipv4Addr::new(198, 18, self.subnet, 1);
        let ours = format!("vg{}", &self.prefix[2..]);
        anyhow::ensure!(ours.len() <= 15, "interface name {ours} too long");
        ip(&[
            "link",
            "add",
            &ours,
            "type",
            "veth",
            "peer",
            "name",
            "gw",
            "netns",
            &self.switch,
        ])?;
        self.gateway = Some(ours.clone());
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            "gw",
            "master",
            "br0",
            "up",
        ])?;
        ip(&["addr", "add", &format!("{addr}/24"), "dev", &ours])?;
        ip(&["link", "set", &ours, "up"])?;
        Ok(addr)
    }
}

impl Host {
    /// A command that runs inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }
}

/// `tc ARGS` inside a namespace.
fn tc(netns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "tc"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run tc (iproute2)")?;
    if !out.status.success() {
        bail!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Host {
    /// Slows the TCP traffic this host sends to `dst` down to `rate` (tc's syntax: `1mbit`),
    /// except what goes to port `except_port` (a control API that must stay responsive).
    /// Everything else leaves unshaped. Replaces any earlier shaping; see [`Host::unshape`].
    /// Built from what the test machines' kernel offers: an htb qdisc and u32 filters.
    pub fn shape(
        &self,
        dst: std::net::Ipv4Addr,
        except_port: Option<u16>,
        rate: &str,
    ) -> Result<()> {
        self.unshape()?;
        let dev = self.iface.as_str();
        tc(
            &self.netns,
            &[
                "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10",
            ],
        )?;
        for (class, rate) in [("1:10", "10gbit"), ("1:20", rate)] {
            tc(
                &self.netns,
                &[
                    "class", "add", "dev", dev, "parent", "1:", "classid", class, "htb", "rate",
                    rate,
                ],
            )?;
        }
        let dst = format!("{dst}/32");
        if let Some(port) = except_port {
            let port = port.to_string();
            tc(
                &self.netns,
                &[
                    "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
                    "u32", "match", "ip", "dst", &dst, "match", "ip", "dport", &port, "0xffff",
                    "flowid", "1:10",
                ],
            )?;
        }
        tc(
            &self.netns,
            &[
                "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "2", "u32",
                "match", "ip", "dst", &dst, "flowid", "1:20",
            ],
        )
    }

    /// Removes the shaping of [`Host::shape`] (nothing to remove is fine).
    pub fn unshape(&self) -> Result<()> {
        let _ = tc(&self.netns, &["qdisc", "del", "dev", &self.iface, "root"]);
        Ok(())
    }
}

impl Host {
    /// Cuts the link between this host and `other` both ways: each gets a "prohibit" route to
    /// the other, so new connections fail at once and established ones carry nothing more
    /// until [`Host::heal`].
    pub fn cut(&self, other: &Host) -> Result<()> {
        for (from, to) in [(self, other), (other, self)] {
            ip(&[
                "-n",
                &from.netns,
                "route",
                "add",
                "prohibit",
                &format!("{}/32", to.addr),
            ])?;
        }
        Ok(())
    }

    /// Undoes [`Host::cut`] (nothing to undo is fine).
    pub fn heal(&self, other: &Host) -> Result<()> {
        for (from, to) in [(self, other), (other, self)] {
            let _ = ip(&[
                "-n",
                &from.netns,
                "route",
                "del",
                "prohibit",
                &format!("{}/32", to.addr),
            ]);
        }
        Ok(())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(g) = &self.gateway {
            let _ = ip(&["link", "del", g]);
        }
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.netns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}
