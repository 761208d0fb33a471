//! Server-side enrichment (D4): the client address behind trusted proxies, the user agent as
//! browser/OS/device, and the crawler flag.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use crate::config::{Cidr, ServerConfig};
use crate::error::ConfigError;

/// Known crawlers, monitors and HTTP libraries; matched case-insensitively as substrings.
/// `woothee`'s own crawler category is checked too.
const BOT_PATTERNS: &[&str] = &[
    "bot",
    "crawl",
    "spider",
    "slurp",
    "archiver",
    "headlesschrome",
    "phantomjs",
    "lighthouse",
    "facebookexternalhit",
    "bingpreview",
    "yandex",
    "baiduspider",
    "sogou",
    "python-requests",
    "python-urllib",
    "curl/",
    "wget/",
    "go-http-client",
    "scrapy",
    "httpclient",
    "libwww",
    "pingdom",
    "uptimerobot",
];

/// Parsed once per distinct user agent string; the cache is cleared when it reaches this.
const UA_CACHE_ENTRIES: usize = 10_000;
/// Longer user agents are cut before parsing (and in the record).
const UA_MAX_BYTES: usize = 512;

/// What the user agent says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UaInfo {
    pub browser: String,
    pub browser_version: String,
    pub os: String,
    pub os_version: String,
    /// woothee's category: `pc`, `smartphone`, `mobilephone`, `appliance`, `crawler`, `misc`,
    /// `UNKNOWN`.
    pub device: String,
    pub crawler: bool,
}

/// A user agent as records carry it: parsed, and the part of a record's `client` it
/// determines already encoded (made once per distinct user agent, not per event).
#[derive(Debug)]
pub struct Agent {
    /// The user agent string (cut to 512 bytes).
    pub user_agent: String,
    pub info: UaInfo,
    /// `"user_agent":…,"browser":…,…,"crawler":…}`: a record's `client` object after its
    /// `ip`, exactly as `serde_json` writes it.
    client_tail: Box<[u8]>,
}

/// The fields of a record's `client` that depend on the user agent alone, in record order.
#[derive(Serialize)]
struct ClientTail<'a> {
    user_agent: &'a str,
    browser: &'a str,
    browser_version: &'a str,
    os: &'a str,
    os_version: &'a str,
    device: &'a str,
    crawler: bool,
}

impl Agent {
    pub fn new(user_agent: &str, info: UaInfo) -> Agent {
        let tail = ClientTail {
            user_agent,
            browser: &info.browser,
            browser_version: &info.browser_version,
            os: &info.os,
            os_version: &info.os_version,
            device: &info.device,
            crawler: info.crawler,
        };
        // `{"user_agent":…}` without its `{`: serialising plain strings and a bool cannot
        // fail, and an empty tail would only make the encoder fall back to serde.
        let json = serde_json::to_vec(&tail).unwrap_or_default();
        let client_tail = json.get(1..).unwrap_or_default().into();
        Agent {
            user_agent: user_agent.to_string(),
            info,
            client_tail,
        }
    }

    /// See [`Agent::client_tail`]; empty if encoding failed.
    pub fn client_tail(&self) -> &[u8] {
        &self.client_tail
    }
}

pub struct Enricher {
    trusted: Vec<Cidr>,
    bots: Vec<String>,
    parser: woothee::parser::Parser,
    cache: Mutex<HashMap<String, Arc<Agent>>>,
}

impl Enricher {
    pub fn new(cfg: &ServerConfig) -> Result<Enricher, ConfigError> {
        let trusted = cfg
            .trusted_proxies
            .iter()
            .map(|s| Cidr::parse(s))
            .collect::<Result<_, _>>()?;
        let bots = BOT_PATTERNS
            .iter()
            .map(|s| (*s).to_string())
            .chain(cfg.bot_patterns.iter().map(|s| s.to_ascii_lowercase()))
            .collect();
        Ok(Enricher {
            trusted,
            bots,
            parser: woothee::parser::Parser::new(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `ip` is one of `trusted_proxies`.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// The client's address: the TCP peer, unless the peer is a trusted proxy, in which case
    /// `X-Forwarded-For` is read right to left, skipping trusted hops, and the first untrusted
    /// address is the client. Hops that do not parse stop the walk (they cannot be believed).
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let Some(xff) = forwarded_for else {
            return peer;
        };
        let mut client = peer;
        for hop in xff.rsplit(',') {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                break;
            };
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        client
    }

    /// The user agent `ua` (cut to 512 bytes), parsed once per distinct string.
    pub fn user_agent(&self, ua: &str) -> Arc<Agent> {
        let ua = truncate(ua, UA_MAX_BYTES);
        if let Some(hit) = self.cache.lock().get(ua) {
            return hit.clone();
        }
        let info = Arc::new(Agent::new(ua, self.parse_ua(ua)));
        let mut cache = self.cache.lock();
        if cache.len() >= UA_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(ua.to_string(), info.clone());
        info
    }

    fn parse_ua(&self, ua: &str) -> UaInfo {
        let lower = ua.to_ascii_lowercase();
        // No user agent at all is not a browser.
        let listed = ua.trim().is_empty() || self.bots.iter().any(|p| lower.contains(p.as_str()));
        match self.parser.parse(ua) {
            Some(r) => UaInfo {
                browser: r.name.to_string(),
                browser_version: r.version.to_string(),
                os: r.os.to_string(),
                os_version: r.os_version.to_string(),
                device: r.category.to_string(),
                crawler: listed || r.category == "crawler",
            },
            None => UaInfo {
                browser: "UNKNOWN".into(),
                browser_version: "UNKNOWN".into(),
                os: "UNKNOWN".into(),
                os_version: "UNKNOWN".into(),
                device: "UNKNOWN".into(),
                crawler: listed,
            },
        }
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn enricher(proxies: &[&str]) -> Enricher {
        let cfg = ServerConfig {
            trusted_proxies: proxies.iter().map(|s| s.to_string()).collect(),
            ..ServerConfig::default()
        };
        Enricher::new(&cfg).unwrap()
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let e = enricher(&["10.0.0.0/8"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Untrusted peer: header ignored.
        assert_eq!(
            e.client_ip(ip("203.0.113.9"), Some("1.2.3.4")),
            ip("203.0.113.9")
        );
        // Trusted peer: rightmost untrusted hop.
        assert_eq!(
            e.client_ip(ip("10.0.0.2"), Some("6.6.6.6, 1.2.3.4, 10.0.0.7")),
            ip("1.2.3.4")
        );
        // Garbage stops the walk at the last believable hop.
        assert_eq!(
            e.client_ip(ip("10.0.0.2"), Some("nonsense, 10.0.0.7")),
            ip("10.0.0.7")
        );
        assert_eq!(e.client_ip(ip("10.0.0.2"), None), ip("10.0.0.2"));
    }

    #[test]
    fn user_agents() {
        let e = enricher(&[]);
        let chrome = e.user_agent(
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
             Chrome/120.0.0.0 Safari/537.36",
        );
        assert_eq!(chrome.info.browser, "Chrome");
        assert_eq!(chrome.info.os, "Windows 10");
        assert_eq!(chrome.info.device, "pc");
        assert!(!chrome.info.crawler);
        let iphone = e.user_agent(
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 \
             (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
        );
        assert_eq!(iphone.info.os, "iPhone");
        assert_eq!(iphone.info.device, "smartphone");
        let google = e
            .user_agent("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)");
        assert!(google.info.crawler);
        assert!(e.user_agent("curl/8.0.1").info.crawler);
        assert!(e.user_agent("").info.crawler);
        let headless = e.user_agent("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 Safari/537.36");
        assert!(headless.info.crawler);
    }
}
