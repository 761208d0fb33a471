//! Feed arbitrary text to the collector's beacon query decoder, then write a beacon record
//! from what it decoded with the hand-written JSON encoder: decoding must never panic, and
//! the record must be byte for byte what `serde_json` writes (so always valid JSON).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use qanat_collect::config::Priority;
use qanat_collect::enrich::{Agent, UaInfo};
use qanat_collect::event::{parse_spm, BeaconRecord, Client, Page};
use qanat_collect::query::{BeaconQuery, Field};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The query, then (after a NUL, if any) the user agent.
    let (query, ua) = text.split_once('\0').unwrap_or((text, ""));
    let q = BeaconQuery::parse(query);
    let get = |f: Field| q.get(f).unwrap_or("");
    let info = UaInfo {
        browser: get(Field::Title).to_string(),
        crawler: ua.len() % 2 == 0,
        ..UaInfo::default()
    };
    let agent = Agent::new(ua, info);
    let client = Client::of(std::net::IpAddr::from([192, 0, 2, 1]), &agent);
    let params: BTreeMap<&str, &str> = q.params().collect();
    let record = BeaconRecord {
        app: get(Field::App),
        ty: get(Field::Type),
        priority: Priority::Normal,
        source: "beacon",
        visitor_id: get(Field::Vid),
        user_id: q.get(Field::Uid),
        received_ms: i64::try_from(data.len()).unwrap_or(0),
        client_ts: get(Field::Ts).parse().ok(),
        client: &client,
        page: Page {
            url: get(Field::Url),
            referrer: get(Field::Ref),
            title: get(Field::Title),
        },
        spm: parse_spm(get(Field::Spm)).ok(),
        screen: q.get(Field::Screen),
        language: q.get(Field::Lang),
        name: q.get(Field::Event),
        params,
    };
    let mut ours = Vec::new();
    record.encode(&mut ours).unwrap();
    assert_eq!(ours, serde_json::to_vec(&record).unwrap());
});
