//! Scraping `/metrics`: a parser of the Prometheus text exposition format (version 0.0.4) by its
//! grammar, for the tests that check the daemons' metrics.
//!
//! Every line is parsed: `# HELP` and `# TYPE` comments (other comments are skipped), samples
//! as a metric name, an optional label set (`{name="value",...}` with the escapes `\\`, `\"`
//! and `\n`), a value (a float, `+Inf`, `-Inf`, `NaN`) and an optional timestamp. Anything
//! else is an error, as are a family declared twice, a sample of a declared family that comes
//! apart from the family's other lines, and a histogram whose buckets are not cumulative or
//! whose `+Inf` bucket differs from its `_count`. A sample belongs to the family its `# TYPE`
//! line declared: the family's name itself, or for a histogram `NAME_bucket` (with an `le`
//! label), `NAME_sum` and `NAME_count`.

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;

/// The type a `# TYPE` line declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `counter`.
    Counter,
    /// `gauge`.
    Gauge,
    /// `histogram`.
    Histogram,
    /// `summary`.
    Summary,
    /// `untyped`, or no `# TYPE` line.
    Untyped,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Its metric name (for a histogram: `NAME_bucket`, `NAME_sum` or `NAME_count`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A metric family: its type, help text and samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// The declared type.
    pub kind: Kind,
    /// The `# HELP` text.
    pub help: String,
    /// The samples, in order.
    pub samples: Vec<Sample>,
}

/// A parsed exposition, by family name.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// The families.
    pub families: BTreeMap<String, Family>,
}

impl Exposition {
    /// Parses `text`; any line that is not of the format is an error naming it.
    pub fn parse(text: &str) -> Result<Exposition> {
        let mut e = Exposition::default();
        let mut current: Option<String> = None;
        let mut closed: Vec<String> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            e.line(line, &mut current, &mut closed)
                .with_context(|| format!("line {}: {line:?}", n + 1))?;
        }
        for (name, f) in &e.families {
            if f.kind == Kind::Histogram {
                check_histogram(name, f)?;
            }
        }
        Ok(e)
    }

    fn line(
        &mut self,
        line: &str,
        current: &mut Option<String>,
        closed: &mut Vec<String>,
    ) -> Result<()> {
        if line.trim().is_empty() {
            return Ok(());
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            let (Some(keyword), Some(name)) = (words.next(), words.next()) else {
                return Ok(());
            };
            let rest = words.next().unwrap_or("");
            match keyword {
                "HELP" | "TYPE" => {
                    let (name, _) = metric_name(name)?;
                    self.switch_to(name, current, closed)?;
                    let f = self.family(name);
                    if keyword == "HELP" {
                        f.help = unescape(rest, false)?;
                    } else {
                        ensure!(f.samples.is_empty(), "# TYPE after samples of {name}");
                        f.kind = match rest.trim() {
                            "counter" => Kind::Counter,
                            "gauge" => Kind::Gauge,
                            "histogram" => Kind::Histogram,
                            "summary" => Kind::Summary,
                            "untyped" => Kind::Untyped,
                            other => bail!("unknown type {other:?}"),
                        };
                    }
                }
                _ => {}
            }
            return Ok(());
        }
        let (name, rest) = metric_name(line)?;
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(inner) => label_set(inner)?,
            None => (BTreeMap::new(), rest),
        };
        let mut fields = rest.split_ascii_whitespace();
        let value = fields.next().context("no value")?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().with_context(|| format!("value {v:?}"))?,
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .with_context(|| format!("timestamp {ts:?}"))?;
        }
        ensure!(fields.next().is_none(), "trailing text");
        let family = self.family_of(name);
        self.switch_to(&family, current, closed)?;
        let f = self.family(&family);
        if f.kind == Kind::Histogram && name.ends_with("_bucket") {
            ensure!(labels.contains_key("le"), "a bucket without le");
        }
        f.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
        Ok(())
    }

    /// The family a sample named `name` belongs to.
    fn family_of(&self, name: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                let kinds = match suffix {
                    "_bucket" => &[Kind::Histogram][..],
                    _ => &[Kind::Histogram, Kind::Summary][..],
                };
                if self
                    .families
                    .get(base)
                    .is_some_and(|f| kinds.contains(&f.kind))
                {
                    return base.to_string();
                }
            }
        }
        name.to_string()
    }

    fn family(&mut self, name: &str) -> &mut Family {
        self.families
            .entry(name.to_string())
            .or_insert_with(|| Family {
                kind: Kind::Untyped,
                help: String::new(),
                samples: Vec::new(),
            })
    }

    /// Lines of `name` follow: the family before is done, and `name` must not have been.
    fn switch_to(
        &self,
        name: &str,
        current: &mut Option<String>,
        closed: &mut Vec<String>,
    ) -> Result<()> {
        if current.as_deref() == Some(name) {
            return Ok(());
        }
        ensure!(
            !closed.iter().any(|c| c == name),
            "family {name} appears twice (its lines must be together)"
        );
        if let Some(prev) = current.replace(name.to_string()) {
            closed.push(prev);
        }
        Ok(())
    }

    /// The samples named `name` whose labels include `labels`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        let family = self.family_of(name);
        self.families
            .get(&family)
            .into_iter()
            .flat_map(|f| f.samples.iter())
            .filter(move |s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
    }

    /// The value of the one sample named `name` whose labels include `labels`; an error when
    /// there is none or more than one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let found: Vec<&Sample> = self.samples(name, labels).collect();
        match found.as_slice() {
            [one] => Ok(one.value),
            [] => bail!("no sample {name} with labels {labels:?}"),
            many => bail!("{} samples {name} with labels {labels:?}", many.len()),
        }
    }

    /// The sum of the samples named `name` whose labels include `labels` (0 when there is none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).map(|s| s.value).sum()
    }

    /// The declared type of family `name`.
    pub fn kind(&self, name: &str) -> Option<Kind> {
        self.families.get(name).map(|f| f.kind)
    }

    /// Checks the names against the Prometheus conventions: every family starts with `prefix`,
    /// has a help text, a counter's name ends in `_total` (the format 0.0.4 names the family
    /// with it), and no name ends in a unit that is not a base unit.
    pub fn check_names(&self, prefix: &str) -> Result<()> {
        for (name, f) in &self.families {
            ensure!(
                name.starts_with(prefix),
                "{name} does not start with {prefix}"
            );
            ensure!(!f.help.is_empty(), "{name} has no help text");
            if f.kind == Kind::Counter {
                ensure!(
                    name.ends_with("_total"),
                    "counter {name} does not end in _total"
                );
            }
            for bad in ["_ms", "_us", "_milliseconds", "_kb", "_mib", "_count_total"] {
                ensure!(!name.contains(bad), "{name}: not in base units");
            }
        }
        Ok(())
    }
}

/// A histogram series' labels without `le`, sorted.
type LabelKey = Vec<(String, String)>;

/// Buckets are cumulative (by `le`), and the `+Inf` bucket is the count.
fn check_histogram(name: &str, f: &Family) -> Result<()> {
    let mut series: BTreeMap<LabelKey, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for s in &f.samples {
        let mut key: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| *k != "le")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        key.sort();
        if s.name.ends_with("_bucket") {
            let le = match s.labels["le"].as_str() {
                "+Inf" => f64::INFINITY,
                v => v.parse().with_context(|| format!("{name}: le {v:?}"))?,
            };
            series.entry(key).or_default().push((le, s.value));
        } else if s.name.ends_with("_count") {
            counts.insert(key, s.value);
        }
    }
    for (key, mut buckets) in series {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        ensure!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name}{key:?}: buckets are not cumulative"
        );
        let inf = buckets.last().filter(|b| b.0.is_infinite()).map(|b| b.1);
        ensure!(
            inf.is_some() && inf == counts.get(&key).copied(),
            "{name}{key:?}: the +Inf bucket is not the count"
        );
    }
    Ok(())
}

/// A metric name at the start of `s`, and the rest.
fn metric_name(s: &str) -> Result<(&str, &str)> {
    let end = s
        .char_indices()
        .find(|&(i, c)| {
            !(c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
        })
        .map_or(s.len(), |(i, _)| i);
    ensure!(end > 0, "no metric name");
    Ok((&s[..end], &s[end..]))
}

/// The label set after its `{`, and the rest after its `}`.
fn label_set(mut s: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let end = s
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_alphabetic() || c == '_' || (i > 0 && c.is_ascii_digit())))
            .map_or(s.len(), |(i, _)| i);
        ensure!(end > 0, "no label name");
        let name = &s[..end];
        let rest = s[end..].trim_start();
        let rest = rest
            .strip_prefix('=')
            .context("no '=' after a label name")?;
        let rest = rest
            .trim_start()
            .strip_prefix('"')
            .context("no '\"' opening a label value")?;
        let (value, rest) = quoted(rest)?;
        ensure!(
            labels.insert(name.to_string(), value).is_none(),
            "label {name} twice"
        );
        let rest = rest.trim_start();
        s = match rest.strip_prefix(',') {
            Some(r) => r,
            None => {
                ensure!(rest.starts_with('}'), "no ',' or '}}' after a label");
                rest
            }
        };
    }
}

/// A label value after its opening quote, and the rest after its closing quote.
fn quoted(s: &str) -> Result<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => out.push('\\'),
                Some((_, '"')) => out.push('"'),
                Some((_, 'n')) => out.push('\n'),
                other => bail!("bad escape {other:?} in a label value"),
            },
            '\n' => bail!("a newline in a label value"),
            c => out.push(c),
        }
    }
    bail!("a label value without its closing '\"'")
}

/// A `# HELP` text with its escapes (`\\` and `\n`) undone.
fn unescape(s: &str, quotes: bool) -> Result<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if quotes => out.push('"'),
            other => bail!("bad escape {other:?}"),
        }
    }
    Ok(out)
}

/// `GET /metrics` of the HTTP server at `addr`, with the bearer `token` if any, parsed.
pub fn scrape_tcp(addr: &str, token: Option<&str>) -> Result<Exposition> {
    let s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    scrape(s, token)
}

/// `GET /metrics` of the HTTP server on the Unix socket `path`, parsed.
pub fn scrape_unix(path: &std::path::Path) -> Result<Exposition> {
    let s = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("connect {}", path.display()))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    scrape(s, None)
}

/// `GET /metrics` on the connection `s` (HTTP/1.1, closed after the answer), parsed; the answer
/// must be 200 with the content type of the format 0.0.4.
fn scrape(mut s: impl std::io::Read + std::io::Write, token: Option<&str>) -> Result<Exposition> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let answer = String::from_utf8(answer).context("the answer is not UTF-8")?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("no end of the answer's head")?;
    let status = head.lines().next().unwrap_or("");
    ensure!(status.starts_with("HTTP/1.1 200"), "GET /metrics: {status}");
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    let content_type = header("content-type").unwrap_or("");
    ensure!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "content type {content_type:?}"
    );
    ensure!(
        header("transfer-encoding").is_none(),
        "a chunked answer (the parser takes a plain body)"
    );
    Exposition::parse(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP a_total Things done.
# TYPE a_total counter
a_total{volume="v1",op="read"} 3
a_total{volume="odd \"name\", with\\ comma",op="write"} 1.5e3
# HELP lat_seconds Latency.
# TYPE lat_seconds histogram
lat_seconds_sum{op="read"} 0.25
lat_seconds_count{op="read"} 2
lat_seconds_bucket{le="0.1",op="read"} 1
lat_seconds_bucket{le="+Inf",op="read"} 2
# A comment.
up 1 1700000000000
"#;

    #[test]
    fn parses_families_labels_with_escapes_and_histograms() {
        let e = Exposition::parse(TEXT).unwrap();
        assert_eq!(e.kind("a_total"), Some(Kind::Counter));
        assert_eq!(e.value("a_total", &[("op", "read")]).unwrap(), 3.0);
        let odd = r#"odd "name", with\ comma"#;
        assert_eq!(e.value("a_total", &[("volume", odd)]).unwrap(), 1500.0);
        assert_eq!(e.sum("a_total", &[]), 1503.0);
        assert_eq!(
            e.value("lat_seconds_count", &[("op", "read")]).unwrap(),
            2.0
        );
        assert_eq!(e.samples("lat_seconds_bucket", &[]).count(), 2);
        assert_eq!(e.kind("up"), Some(Kind::Untyped));
        assert!(e.value("a_total", &[]).is_err(), "two samples match");
    }

    #[test]
    fn refuses_what_is_not_the_format() {
        for bad in [
            "a{x=\"1} 2",
            "a{x=1} 2",
            "a 1 2 3",
            "a one",
            "# TYPE a counter\na 1\n# TYPE b gauge\nb 1\na 2",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_count 2",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3",
            "{x=\"1\"} 2",
        ] {
            assert!(Exposition::parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
