//! Input validation and the record written to the bus, for beacons (D1, D2, D6) and app
//! batches (D3).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::IpAddr;

use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::Priority;
use crate::enrich::{Agent, UaInfo};
use crate::json;

/// App names, event types, visitor and user ids: short, printable, no separators that could
/// confuse topic routing or log processing.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// An SPM position code `a.b.c.d` (site.page.block.position); a page view may carry only
/// `a.b`, so 2 to 4 segments.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct Spm<'a> {
    pub code: &'a str,
    pub a: &'a str,
    pub b: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub c: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub d: Option<&'a str>,
}

pub fn parse_spm(code: &str) -> Result<Spm<'_>, String> {
    let bad = || {
        format!(
            "spm {:?} is not a.b[.c[.d]] of [A-Za-z0-9_-]",
            crate::enrich::truncate(code, 80)
        )
    };
    // One scan over the bytes, at most 4 segments: no vector, no splitter per beacon.
    let mut parts = [""; 4];
    let mut count = 0;
    let mut start = 0;
    let bytes = code.as_bytes();
    for i in 0..=bytes.len() {
        match bytes.get(i) {
            Some(b'.') | None => {
                let part = code.get(start..i).unwrap_or("");
                let Some(slot) = parts
                    .get_mut(count)
                    .filter(|_| !part.is_empty() && part.len() <= 64)
                else {
                    return Err(bad());
                };
                *slot = part;
                count += 1;
                start = i + 1;
            }
            Some(&b) if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' => {}
            Some(_) => return Err(bad()),
        }
    }
    if count < 2 {
        return Err(bad());
    }
    Ok(Spm {
        code,
        a: parts[0],
        b: parts[1],
        c: (count > 2).then_some(parts[2]),
        d: (count > 3).then_some(parts[3]),
    })
}

/// Where and from what the request came, added to every record.
#[derive(Debug, Serialize)]
pub struct Client<'a> {
    pub ip: IpAddr,
    pub user_agent: &'a str,
    pub browser: &'a str,
    pub browser_version: &'a str,
    pub os: &'a str,
    pub os_version: &'a str,
    pub device: &'a str,
    pub crawler: bool,
    /// These fields after `ip`, already encoded ([`Agent::client_tail`]), when known.
    #[serde(skip)]
    tail: &'a [u8],
}

impl<'a> Client<'a> {
    pub fn new(ip: IpAddr, user_agent: &'a str, ua: &'a UaInfo) -> Client<'a> {
        Client {
            ip,
            user_agent,
            browser: &ua.browser,
            browser_version: &ua.browser_version,
            os: &ua.os,
            os_version: &ua.os_version,
            device: &ua.device,
            crawler: ua.crawler,
            tail: &[],
        }
    }

    /// The client at `ip` with the user agent `agent`, whose encoded part records reuse.
    pub fn of(ip: IpAddr, agent: &'a Agent) -> Client<'a> {
        Client {
            tail: agent.client_tail(),
            ..Client::new(ip, &agent.user_agent, &agent.info)
        }
    }

    /// Append this client as JSON, as `serde_json` writes it.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        if self.tail.is_empty() {
            return serde_json::to_writer(out, self);
        }
        out.extend_from_slice(b"{\"ip\":");
        json::write_ip(out, self.ip);
        out.push(b',');
        out.extend_from_slice(self.tail);
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct Page<'a> {
    pub url: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub referrer: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub title: &'a str,
}

/// A beacon (`/t.gif`) as it goes to the bus.
#[derive(Debug, Serialize)]
pub struct BeaconRecord<'a> {
    pub app: &'a str,
    #[serde(rename = "type")]
    pub ty: &'a str,
    pub priority: Priority,
    pub source: &'static str,
    pub visitor_id: &'a str,
    pub user_id: Option<&'a str>,
    pub received_ms: i64,
    pub client_ts: Option<i64>,
    pub client: &'a Client<'a>,
    pub page: Page<'a>,
    pub spm: Option<Spm<'a>>,
    pub screen: Option<&'a str>,
    pub language: Option<&'a str>,
    /// Custom event name (`e=`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    /// `p_*` query parameters, prefix removed: business parameters of the page or click.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<&'a str, &'a str>,
}

impl BeaconRecord<'_> {
    /// Append the record as JSON: byte for byte what `serde_json` writes, written directly
    /// (field names as constants, strings through [`json::write_str`], the client's user
    /// agent part made once per user agent).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        out.reserve(512);
        out.extend_from_slice(b"{\"app\":");
        json::write_str(out, self.app);
        out.extend_from_slice(b",\"type\":");
        json::write_str(out, self.ty);
        out.extend_from_slice(b",\"priority\":\"");
        out.extend_from_slice(self.priority.as_str().as_bytes());
        out.extend_from_slice(b"\",\"source\":");
        json::write_str(out, self.source);
        out.extend_from_slice(b",\"visitor_id\":");
        json::write_str(out, self.visitor_id);
        out.extend_from_slice(b",\"user_id\":");
        json::write_opt_str(out, self.user_id);
        out.extend_from_slice(b",\"received_ms\":");
        json::write_i64(out, self.received_ms);
        out.extend_from_slice(b",\"client_ts\":");
        json::write_opt_i64(out, self.client_ts);
        out.extend_from_slice(b",\"client\":");
        self.client.encode(out)?;
        out.extend_from_slice(b",\"page\":{\"url\":");
        json::write_str(out, self.page.url);
        if !self.page.referrer.is_empty() {
            out.extend_from_slice(b",\"referrer\":");
            json::write_str(out, self.page.referrer);
        }
        if !self.page.title.is_empty() {
            out.extend_from_slice(b",\"title\":");
            json::write_str(out, self.page.title);
        }
        out.extend_from_slice(b"},\"spm\":");
        write_spm(out, self.spm.as_ref());
        out.extend_from_slice(b",\"screen\":");
        json::write_opt_str(out, self.screen);
        out.extend_from_slice(b",\"language\":");
        json::write_opt_str(out, self.language);
        if let Some(name) = self.name {
            out.extend_from_slice(b",\"name\":");
            json::write_str(out, name);
        }
        if !self.params.is_empty() {
            out.extend_from_slice(b",\"params\":");
            let mut sep = b'{';
            for (k, v) in &self.params {
                out.push(sep);
                sep = b',';
                json::write_str(out, k);
                out.push(b':');
                json::write_str(out, v);
            }
            out.push(b'}');
        }
        out.push(b'}');
        Ok(())
    }
}

/// Append an SPM code as JSON, or `null`.
fn write_spm(out: &mut Vec<u8>, spm: Option<&Spm<'_>>) {
    match spm {
        Some(spm) => {
            out.extend_from_slice(b"{\"code\":");
            json::write_str(out, spm.code);
            out.extend_from_slice(b",\"a\":");
            json::write_str(out, spm.a);
            out.extend_from_slice(b",\"b\":");
            json::write_str(out, spm.b);
            if let Some(c) = spm.c {
                out.extend_from_slice(b",\"c\":");
                json::write_str(out, c);
            }
            if let Some(d) = spm.d {
                out.extend_from_slice(b",\"d\":");
                json::write_str(out, d);
            }
            out.push(b'}');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// `POST /v1/events` body.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    pub app: String,
    /// Device info; `device.id` is the visitor id of app events (D1: device id in apps).
    #[serde(default)]
    pub device: Option<Map<String, Value>>,
    /// `user.id` when logged in.
    #[serde(default)]
    pub user: Option<Map<String, Value>>,
    #[serde(borrow)]
    pub events: Vec<&'a RawValue>,
}

/// One app event as it goes to the bus: the event object as sent, plus envelope and server
/// fields.
#[derive(Debug, Serialize)]
pub struct BatchRecord<'a> {
    pub app: &'a str,
    #[serde(rename = "type")]
    pub ty: &'a str,
    pub priority: Priority,
    pub source: &'static str,
    pub visitor_id: &'a str,
    pub user_id: Option<&'a str>,
    pub received_ms: i64,
    pub client_ts: Option<i64>,
    pub client: &'a Client<'a>,
    pub spm: Option<Spm<'a>>,
    pub device: Option<&'a Map<String, Value>>,
    /// The event exactly as the client sent it (validated, not re-encoded).
    pub event: &'a RawValue,
}

/// A JSON value as far as event validation needs it. Parsing into it checks the whole value
/// exactly as parsing a `serde_json::Value` would (syntax, escapes, number range, nesting),
/// without building the tree.
#[derive(Debug)]
pub enum Probe<'a> {
    Null,
    Bool,
    /// `f`: the number as `f64` (`Value::as_f64`); `i`: as `i64` when it is an integer that fits
    /// (`Value::as_i64`).
    Num {
        f: f64,
        i: Option<i64>,
    },
    Str(Cow<'a, str>),
    Array {
        empty: bool,
    },
    /// An object; whether its `name` and `url` fields (last occurrence) are non-blank strings
    /// (what a `page` needs).
    Object {
        name_ok: bool,
        url_ok: bool,
    },
}

impl Probe<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Probe::Str(s) => Some(s),
            _ => None,
        }
    }

    fn non_blank(&self) -> bool {
        self.as_str().is_some_and(|s| !s.trim().is_empty())
    }
}

/// Any JSON value, validated as `serde_json::Value` would be, then dropped.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Skip, D::Error> {
        d.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_unit<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_none<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Skip, D::Error> {
        Skip::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_key::<Skip>()?.is_some() {
            map.next_value::<Skip>()?;
        }
        Ok(Skip)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Probe<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Probe<'a>, D::Error> {
        d.deserialize_any(ProbeVisitor(PhantomData))
    }
}

struct ProbeVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for ProbeVisitor<'a> {
    type Value = Probe<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Probe<'a>, E> {
        Ok(Probe::Bool)
    }
    fn visit_i64<E>(self, i: i64) -> Result<Probe<'a>, E> {
        #[allow(clippy::cast_precision_loss)]
        Ok(Probe::Num {
            f: i as f64,
            i: Some(i),
        })
    }
    fn visit_u64<E>(self, u: u64) -> Result<Probe<'a>, E> {
        #[allow(clippy::cast_precision_loss)]
        Ok(Probe::Num {
            f: u as f64,
            i: i64::try_from(u).ok(),
        })
    }
    fn visit_f64<E>(self, f: f64) -> Result<Probe<'a>, E> {
        Ok(Probe::Num { f, i: None })
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Probe<'a>, E> {
        Ok(Probe::Str(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Probe<'a>, E> {
        Ok(Probe::Str(Cow::Owned(s.to_string())))
    }
    fn visit_string<E>(self, s: String) -> Result<Probe<'a>, E> {
        Ok(Probe::Str(Cow::Owned(s)))
    }
    fn visit_unit<E>(self) -> Result<Probe<'a>, E> {
        Ok(Probe::Null)
    }
    fn visit_none<E>(self) -> Result<Probe<'a>, E> {
        Ok(Probe::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Probe<'a>, D::Error> {
        Probe::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Probe<'a>, A::Error> {
        let mut empty = true;
        while seq.next_element::<Skip>()?.is_some() {
            empty = false;
        }
        Ok(Probe::Array { empty })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Probe<'a>, A::Error> {
        let (mut name_ok, mut url_ok) = (false, false);
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Name => name_ok = map.next_value::<Probe<'_>>()?.non_blank(),
                Key::Url => url_ok = map.next_value::<Probe<'_>>()?.non_blank(),
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Probe::Object { name_ok, url_ok })
    }
}

/// The object keys event validation looks at.
#[derive(Clone, Copy)]
enum Key {
    Type,
    Page,
    Control,
    Name,
    Url,
    DurationMs,
    Properties,
    Items,
    Ts,
    VisitorId,
    UserId,
    Spm,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E>(self, s: &str) -> Result<Key, E> {
        Ok(match s {
            "type" => Key::Type,
            "page" => Key::Page,
            "control" => Key::Control,
            "name" => Key::Name,
            "url" => Key::Url,
            "duration_ms" => Key::DurationMs,
            "properties" => Key::Properties,
            "items" => Key::Items,
            "ts" => Key::Ts,
            "visitor_id" => Key::VisitorId,
            "user_id" => Key::UserId,
            "spm" => Key::Spm,
            _ => Key::Other,
        })
    }
}

/// The fields of one batch event that validation and routing read (the last occurrence of
/// each, as in a `serde_json::Map`); the rest of the event is checked to be valid JSON and
/// forwarded as sent.
#[derive(Debug, Default)]
pub struct EventFields<'a> {
    pub ty: Option<Probe<'a>>,
    pub page: Option<Probe<'a>>,
    pub control: Option<Probe<'a>>,
    pub name: Option<Probe<'a>>,
    pub duration_ms: Option<Probe<'a>>,
    pub properties: Option<Probe<'a>>,
    pub items: Option<Probe<'a>>,
    pub ts: Option<Probe<'a>>,
    pub visitor_id: Option<Probe<'a>>,
    pub user_id: Option<Probe<'a>>,
    pub spm: Option<Probe<'a>>,
}

impl<'a> EventFields<'a> {
    /// Parse one event; errors read as `serde_json::from_str::<Map<String, Value>>` would.
    pub fn parse(text: &'a str) -> Result<EventFields<'a>, serde_json::Error> {
        serde_json::from_str(text)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for EventFields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<EventFields<'a>, D::Error> {
        d.deserialize_map(FieldsVisitor(PhantomData))
    }
}

struct FieldsVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for FieldsVisitor<'a> {
    type Value = EventFields<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EventFields<'a>, A::Error> {
        let mut ev = EventFields::default();
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::Type => &mut ev.ty,
                Key::Page => &mut ev.page,
                Key::Control => &mut ev.control,
                Key::Name => &mut ev.name,
                Key::DurationMs => &mut ev.duration_ms,
                Key::Properties => &mut ev.properties,
                Key::Items => &mut ev.items,
                Key::Ts => &mut ev.ts,
                Key::VisitorId => &mut ev.visitor_id,
                Key::UserId => &mut ev.user_id,
                Key::Spm => &mut ev.spm,
                Key::Url | Key::Other => {
                    map.next_value::<Skip>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(ev)
    }
}

fn str_field<'m>(f: &'m Option<Probe<'_>>) -> Option<&'m str> {
    f.as_ref().and_then(Probe::as_str)
}

fn non_empty_str(f: &Option<Probe<'_>>) -> bool {
    f.as_ref().is_some_and(Probe::non_blank)
}

/// The checked parts of one batch event.
#[derive(Debug)]
pub struct Checked<'m> {
    pub ty: &'m str,
    pub visitor_id: &'m str,
    pub user_id: Option<&'m str>,
    pub client_ts: Option<i64>,
    pub spm: Option<Spm<'m>>,
}

/// Validate one event of a batch (D3). Required fields by type:
/// `page_view`: `page` object with `name` or `url`; `click`: `control` and `page`;
/// `custom`: `name` (and `duration_ms` ≥ 0, `properties` an object, when present);
/// `exposure`: non-empty `items` array. Other types need only `type`.
pub fn check_event<'m>(
    ev: &'m EventFields<'_>,
    env_visitor: Option<&'m str>,
    env_user: Option<&'m str>,
) -> Result<Checked<'m>, String> {
    let ty = match &ev.ty {
        Some(Probe::Str(t)) if valid_id(t) => t.as_ref(),
        Some(_) => return Err("type must be a short name of [A-Za-z0-9_.:-]".into()),
        None => return Err("missing field `type`".into()),
    };
    let page_ok = |required: bool| match &ev.page {
        Some(Probe::Object { name_ok, url_ok }) => {
            if *name_ok || *url_ok {
                Ok(())
            } else {
                Err(format!("{ty}: page needs `name` or `url`"))
            }
        }
        Some(_) => Err(format!("{ty}: page must be an object")),
        None if required => Err(format!("{ty}: missing field `page`")),
        None => Ok(()),
    };
    match ty {
        "page_view" => page_ok(true)?,
        "click" => {
            if !non_empty_str(&ev.control) {
                return Err("click: missing field `control`".into());
            }
            page_ok(true)?;
        }
        "custom" => {
            if !non_empty_str(&ev.name) {
                return Err("custom: missing field `name`".into());
            }
            if let Some(d) = &ev.duration_ms {
                if !matches!(d, Probe::Num { f, .. } if *f >= 0.0) {
                    return Err("custom: duration_ms must be a number ≥ 0".into());
                }
            }
            if ev
                .properties
                .as_ref()
                .is_some_and(|p| !matches!(p, Probe::Object { .. }))
            {
                return Err("custom: properties must be an object".into());
            }
            page_ok(false)?;
        }
        "exposure" => {
            if !matches!(ev.items, Some(Probe::Array { empty: false })) {
                return Err("exposure: items must be a non-empty array".into());
            }
            page_ok(false)?;
        }
        _ => {}
    }
    let client_ts = match &ev.ts {
        None | Some(Probe::Null) => None,
        Some(Probe::Num { i: Some(i), .. }) => Some(*i),
        Some(_) => return Err("ts must be an integer (ms since the epoch)".into()),
    };
    let visitor_id = match str_field(&ev.visitor_id).or(env_visitor) {
        Some(v) if valid_id(v) => v,
        Some(_) => return Err("visitor id (device.id or visitor_id) is not a valid id".into()),
        None => return Err("missing visitor id: set device.id (or visitor_id)".into()),
    };
    let user_id = str_field(&ev.user_id)
        .or(env_user)
        .filter(|u| !u.is_empty());
    let spm = match str_field(&ev.spm) {
        Some(s) => Some(parse_spm(s)?),
        None => None,
    };
    Ok(Checked {
        ty,
        visitor_id,
        user_id,
        client_ts,
        spm,
    })
}

/// Writes the records of one batch: the parts shared by every event of the batch (app,
/// client, device, receive time) are encoded once. The output is byte for byte what
/// `serde_json` makes of a [`BatchRecord`].
pub struct BatchEncoder {
    /// `{"app":APP,"type":`
    head: Vec<u8>,
    /// `,"received_ms":N,"client_ts":`
    received: Vec<u8>,
    /// `,"client":{…}`
    client: Vec<u8>,
    /// `,"device":{…}|null,"event":`
    device: Vec<u8>,
}

impl BatchEncoder {
    pub fn new(
        app: &str,
        received_ms: i64,
        client: &Client<'_>,
        device: Option<&Map<String, Value>>,
    ) -> Result<BatchEncoder, serde_json::Error> {
        let mut head = b"{\"app\":".to_vec();
        serde_json::to_writer(&mut head, app)?;
        head.extend_from_slice(b",\"type\":");
        let received = format!(",\"received_ms\":{received_ms},\"client_ts\":").into_bytes();
        let mut cl = b",\"client\":".to_vec();
        client.encode(&mut cl)?;
        let mut dev = b",\"device\":".to_vec();
        serde_json::to_writer(&mut dev, &device)?;
        dev.extend_from_slice(b",\"event\":");
        Ok(BatchEncoder {
            head,
            received,
            client: cl,
            device: dev,
        })
    }

    /// About how many bytes a record takes besides the event itself.
    pub fn overhead(&self) -> usize {
        self.head.len() + self.received.len() + self.client.len() + self.device.len() + 256
    }

    /// Append one record to `out`.
    pub fn encode(
        &self,
        out: &mut Vec<u8>,
        c: &Checked<'_>,
        priority: Priority,
        event: &RawValue,
    ) -> Result<(), serde_json::Error> {
        out.reserve(self.overhead() + event.get().len());
        out.extend_from_slice(&self.head);
        json::write_str(out, c.ty);
        out.extend_from_slice(b",\"priority\":\"");
        out.extend_from_slice(priority.as_str().as_bytes());
        out.extend_from_slice(b"\",\"source\":\"batch\",\"visitor_id\":");
        json::write_str(out, c.visitor_id);
        out.extend_from_slice(b",\"user_id\":");
        json::write_opt_str(out, c.user_id);
        out.extend_from_slice(&self.received);
        json::write_opt_i64(out, c.client_ts);
        out.extend_from_slice(&self.client);
        out.extend_from_slice(b",\"spm\":");
        write_spm(out, c.spm.as_ref());
        out.extend_from_slice(&self.device);
        out.extend_from_slice(event.get().as_bytes());
        out.push(b'}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The segment rule as first written: split, count, check each.
    fn spm_by_split(code: &str) -> Option<Vec<&str>> {
        let parts: Vec<&str> = code.split('.').collect();
        let ok = (2..=4).contains(&parts.len())
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.len() <= 64
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        ok.then_some(parts)
    }

    proptest::proptest! {
        #[test]
        fn spm_parsing_agrees_with_splitting(code in "[a-c._\\-é ]{0,12}|[a-z]{60,70}\\.[a-z]{1,3}") {
            let want = spm_by_split(&code);
            let got = parse_spm(&code).ok().map(|s| {
                [Some(s.a), Some(s.b), s.c, s.d].into_iter().flatten().collect::<Vec<_>>()
            });
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn spm_codes() {
        let s = parse_spm("shop.home.banner.3").unwrap();
        assert_eq!(
            (s.a, s.b, s.c, s.d),
            ("shop", "home", Some("banner"), Some("3"))
        );
        assert!(parse_spm("shop.home").is_ok());
        for bad in ["", "a", "a..b", "a.b.c.d.e", "a.b c", "a.<b>"] {
            assert!(parse_spm(bad).is_err(), "{bad:?}");
        }
    }

    fn check(v: &Value, visitor: Option<&str>) -> Result<String, String> {
        let text = v.to_string();
        let f = EventFields::parse(&text).map_err(|e| e.to_string())?;
        check_event(&f, visitor, None).map(|c| c.ty.to_string())
    }

    #[test]
    fn event_checks() {
        let ok = |v: Value| check(&v, Some("dev-1"));
        assert_eq!(
            ok(serde_json::json!({"type":"page_view","page":{"name":"home"}})).unwrap(),
            "page_view"
        );
        assert!(ok(serde_json::json!({"type":"page_view"}))
            .unwrap_err()
            .contains("page"));
        assert!(
            ok(serde_json::json!({"type":"page_view","page":{"name":" "}}))
                .unwrap_err()
                .contains("needs")
        );
        assert!(ok(serde_json::json!({"type":"page_view","page":"home"}))
            .unwrap_err()
            .contains("object"));
        assert!(
            ok(serde_json::json!({"type":"click","page":{"name":"home"}}))
                .unwrap_err()
                .contains("control")
        );
        assert!(ok(serde_json::json!({"type":"custom","name":"x","duration_ms":-1})).is_err());
        assert!(ok(serde_json::json!({"type":"custom","name":"x","duration_ms":1.5})).is_ok());
        assert!(ok(serde_json::json!({"type":"custom","name":"x","properties":[]})).is_err());
        assert!(ok(serde_json::json!({"type":"exposure","items":[]})).is_err());
        assert!(ok(serde_json::json!({"type":"exposure","items":[{"id":"a","count":3}]})).is_ok());
        assert!(ok(serde_json::json!({"page":{"name":"home"}}))
            .unwrap_err()
            .contains("type"));
        assert!(ok(serde_json::json!({"type":"x y"})).is_err());
        assert!(ok(serde_json::json!({"type":null})).is_err());
        assert!(ok(serde_json::json!({"type":"x","ts":"yesterday"})).is_err());
        assert!(ok(serde_json::json!({"type":"x","ts":1.5})).is_err());
        assert!(ok(serde_json::json!({"type":"x","ts":null})).is_ok());
        assert!(ok(serde_json::json!({"type":"x","ts":-5})).is_ok());
        assert!(check(&serde_json::json!({"type":"x"}), None)
            .unwrap_err()
            .contains("visitor"));
        assert!(check(&serde_json::json!({"type":"x","visitor_id":"v"}), None).is_ok());
    }

    #[test]
    fn event_parse_errors_match_a_json_map() {
        let cases = [
            r#"[1]"#,
            r#""x""#,
            r#"{"type":"x","n":1e400}"#,
            r#"{"type":"x","s":"\ud800"}"#,
            r#"{"type":"x","a":[1,{"b":1e999}]}"#,
            r#"{"type":"x","k":tru}"#,
            r#"{"type":"x","t\u00e9":{"deep":[[[]]]}}"#,
        ];
        for text in cases {
            let want = serde_json::from_str::<Map<String, Value>>(text).map(|_| ());
            let got = EventFields::parse(text).map(|_| ());
            assert_eq!(
                got.map_err(|e| e.to_string()),
                want.map_err(|e| e.to_string()),
                "{text}"
            );
        }
        // Last occurrence wins, as in a map.
        let f = EventFields::parse(r#"{"type":"a b","type":"ok","page":{"name":"","name":"p"}}"#)
            .unwrap();
        let c = check_event(&f, Some("v"), None).unwrap();
        assert_eq!(c.ty, "ok");
        assert!(matches!(f.page, Some(Probe::Object { name_ok: true, .. })));
        let f = EventFields::parse(r#"{"type":"t\u0065st"}"#).unwrap();
        assert_eq!(check_event(&f, Some("v"), None).unwrap().ty, "test");
    }

    #[test]
    fn batch_encoder_writes_what_serde_writes() {
        let ua = UaInfo {
            browser: "Chrome".into(),
            browser_version: "120.0".into(),
            os: "Windows \"10\"".into(),
            os_version: "NT".into(),
            device: "pc".into(),
            crawler: false,
        };
        let client = Client::new("10.1.2.3".parse().unwrap(), "Mozilla/5.0 \u{1} é", &ua);
        let device: Map<String, Value> =
            serde_json::from_str(r#"{"os":"Android","id":"d-1","model":"Pixel \"8\""}"#).unwrap();
        let events = [
            r#"{"type":"click","page":{"name":"home"},"control":"c","spm":"a.b.c.d","ts":17}"#,
            r#"{"type":"custom","name":"n","user_id":"u\u00e9","visitor_id":"v-2"}"#,
            r#"{ "type" : "page_view", "page" : {"url":"x"} }"#,
        ];
        for device in [Some(&device), None] {
            let enc = BatchEncoder::new("shop\"app", 1_700_000_000_123, &client, device).unwrap();
            for (i, text) in events.iter().enumerate() {
                let raw: &RawValue = serde_json::from_str(text).unwrap();
                let f = EventFields::parse(raw.get()).unwrap();
                let c = check_event(&f, Some("d-1"), Some("u-1")).unwrap();
                let priority = [Priority::Low, Priority::Normal, Priority::High][i];
                let mut got = Vec::new();
                enc.encode(&mut got, &c, priority, raw).unwrap();
                let want = serde_json::to_vec(&BatchRecord {
                    app: "shop\"app",
                    ty: c.ty,
                    priority,
                    source: "batch",
                    visitor_id: c.visitor_id,
                    user_id: c.user_id,
                    received_ms: 1_700_000_000_123,
                    client_ts: c.client_ts,
                    client: &client,
                    spm: c.spm,
                    device,
                    event: raw,
                })
                .unwrap();
                assert_eq!(
                    String::from_utf8(got).unwrap(),
                    String::from_utf8(want).unwrap()
                );
            }
        }
    }

    fn beacon_encodings(rec: &BeaconRecord<'_>) -> (String, String) {
        let mut got = Vec::new();
        rec.encode(&mut got).unwrap();
        let want = serde_json::to_vec(rec).unwrap();
        (
            String::from_utf8(got).unwrap(),
            String::from_utf8(want).unwrap(),
        )
    }

    #[test]
    fn beacon_encoder_writes_what_serde_writes() {
        let ua = UaInfo {
            browser: "Chrome".into(),
            browser_version: "120.0".into(),
            os: "Windows \"10\"".into(),
            os_version: "NT\\x".into(),
            device: "pc".into(),
            crawler: true,
        };
        let agent = Agent::new("Mozilla/5.0 \u{1} é \u{7f}\n", ua.clone());
        let spms = [
            None,
            Some(parse_spm("a.b").unwrap()),
            Some(parse_spm("shop.item.list.7").unwrap()),
            Some(parse_spm("a-1.b_2.c").unwrap()),
        ];
        let ips = ["127.0.0.1", "203.0.113.250", "2001:db8::1"];
        let mut params = BTreeMap::new();
        for (n, spm) in spms.into_iter().enumerate() {
            for (m, ip) in ips.iter().enumerate() {
                let ip: IpAddr = ip.parse().unwrap();
                // The cached client part, and serde's own (an agent made elsewhere).
                let cached = Client::of(ip, &agent);
                let plain = Client::new(ip, "UA \"x\"", &ua);
                for client in [&cached, &plain] {
                    let odd = (n + m) % 2 == 1;
                    let rec = BeaconRecord {
                        app: "web",
                        ty: "page_view",
                        priority: [Priority::Low, Priority::Normal, Priority::High][m],
                        source: "beacon",
                        visitor_id: "v-1",
                        user_id: odd.then_some("u\"1"),
                        received_ms: 1_700_000_000_123,
                        client_ts: odd.then_some(-5),
                        client,
                        page: Page {
                            url: "https://shop.example/item?id=42&q=\"<x>\"\t",
                            referrer: if odd { "" } else { "https://search.example/" },
                            title: if odd { "T\u{2028}ü\\" } else { "" },
                        },
                        spm: spm.as_ref().map(|s| Spm { ..*s }),
                        screen: odd.then_some("1920x1080"),
                        language: (!odd).then_some("en-US"),
                        name: odd.then_some("video\u{0}play"),
                        params: params.clone(),
                    };
                    let (got, want) = beacon_encodings(&rec);
                    assert_eq!(got, want);
                }
                params.insert(["x", "a\"b", "é"][m], ["1", "", "\u{1f}"][n % 3]);
            }
        }
        // The cached part is what serde writes for the same client.
        let mut cached = Vec::new();
        Client::of("10.0.0.1".parse().unwrap(), &agent)
            .encode(&mut cached)
            .unwrap();
        let plain = Client::new("10.0.0.1".parse().unwrap(), &agent.user_agent, &agent.info);
        assert_eq!(cached, serde_json::to_vec(&plain).unwrap());
    }

    proptest::proptest! {
        #[test]
        fn beacon_encoder_writes_what_serde_writes_for_any_strings(
            s in proptest::collection::vec(proptest::prelude::any::<String>(), 12),
            n in proptest::prelude::any::<i64>(),
            flags in proptest::prelude::any::<u8>(),
        ) {
            let ua = UaInfo {
                browser: s[0].clone(),
                browser_version: s[1].clone(),
                os: s[2].clone(),
                os_version: s[3].clone(),
                device: s[4].clone(),
                crawler: flags & 1 == 1,
            };
            let agent = Agent::new(&s[5], ua);
            let client = Client::of("192.0.2.1".parse().unwrap(), &agent);
            let on = |bit: u8| flags & (1 << bit) != 0;
            let mut params = BTreeMap::new();
            if on(1) {
                params.insert(s[6].as_str(), s[7].as_str());
                params.insert(s[8].as_str(), s[9].as_str());
            }
            let rec = BeaconRecord {
                app: &s[6],
                ty: &s[7],
                priority: Priority::Normal,
                source: "beacon",
                visitor_id: &s[8],
                user_id: on(2).then_some(s[9].as_str()),
                received_ms: n,
                client_ts: on(3).then_some(n.wrapping_neg()),
                client: &client,
                page: Page {
                    url: &s[9],
                    referrer: &s[10],
                    title: &s[11],
                },
                spm: on(4).then(|| Spm { code: &s[0], a: &s[1], b: &s[2], c: on(5).then_some(s[3].as_str()), d: on(6).then_some(s[4].as_str()) }),
                screen: on(5).then_some(s[10].as_str()),
                language: on(6).then_some(s[11].as_str()),
                name: on(7).then_some(s[5].as_str()),
                params,
            };
            let (got, want) = beacon_encodings(&rec);
            proptest::prop_assert_eq!(got, want);
        }
    }
}
