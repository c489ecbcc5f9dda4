//! Small pieces of the reports: ping summaries and guest `name=value` output.

use std::collections::BTreeMap;

/// Loss and round-trip summary of one busybox ping run.
#[derive(Debug, Clone)]
pub struct Ping {
    pub loss: Option<f64>,
    /// min/avg/max in ms, as ping prints it.
    pub rtt: Option<String>,
}

impl Ping {
    /// Reads the summary lines of busybox's or iputils' ping (whose rtt line
    /// is `rtt min/avg/max/mdev = a/b/c/d ms`).
    pub fn parse(text: &str) -> Ping {
        let loss = text
            .lines()
            .find_map(|l| l.split_once("% packet loss"))
            .and_then(|(head, _)| head.rsplit([' ', ',']).next()?.parse().ok());
        let rtt = text
            .lines()
            .find_map(|l| {
                l.split_once("min/avg/max = ")
                    .or_else(|| l.split_once("min/avg/max/mdev = "))
            })
            .map(|(_, tail)| {
                let values = tail.trim_end_matches(" ms").trim();
                values.split('/').take(3).collect::<Vec<_>>().join("/")
            });
        Ping { loss, rtt }
    }

    pub fn ok(&self) -> bool {
        self.loss == Some(0.0)
    }

    /// The average round trip in ms.
    pub fn avg(&self) -> Option<&str> {
        self.rtt.as_deref().and_then(|r| r.split('/').nth(1))
    }

    pub fn describe(&self) -> String {
        let loss = self
            .loss
            .map_or("no reply summary".into(), |l| format!("{l}% loss"));
        let rtt = self.rtt.as_deref().map_or(String::new(), |r| {
            let avg = r.split('/').nth(1).unwrap_or(r);
            format!(", avg {avg} ms (min/avg/max {r})")
        });
        loss + &rtt
    }
}

/// `name=value` lines of a guest command's output.
pub fn key_values(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summary() {
        let p = Ping::parse(
            "3 packets transmitted, 3 packets received, 0% packet loss\n\
             round-trip min/avg/max = 0.945/3.325/7.944 ms\n",
        );
        assert!(p.ok());
        assert_eq!(p.avg(), Some("3.325"));
        let p = Ping::parse("2 packets transmitted, 1 packets received, 50% packet loss\n");
        assert!(!p.ok());
        // iputils
        let p = Ping::parse(
            "3 packets transmitted, 3 received, 0% packet loss, time 2003ms\n\
             rtt min/avg/max/mdev = 0.412/0.655/1.015/0.259 ms\n",
        );
        assert!(p.ok());
        assert_eq!(p.avg(), Some("0.655"));
        assert_eq!(p.rtt.as_deref(), Some("0.412/0.655/1.015"));
    }
}
