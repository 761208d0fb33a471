//! End-to-end tests of `qanat collect` (D1–D4): the real binary in front of a real broker,
//! events read back with librdkafka, a real headless Chromium for the tracker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod collect_support;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use collect_support::{chromium, Collector};
use serde_json::{json, Value};
use support::{
    consume_all, http, poll_until, responses, try_http, watermarks, Broker, Msg, DEADLINE,
};

fn values(msgs: &[Msg]) -> Vec<Value> {
    msgs.iter()
        .map(|m| serde_json::from_slice(m.value.as_deref().unwrap()).unwrap())
        .collect()
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

const JSON: (&str, &str) = ("Content-Type", "application/json");

/// (what, request headers, body, expected status, text the reason must contain)
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);

#[test]
fn browser_page_view_and_click_arrive_with_their_fields() {
    let broker = Broker::start();
    let c = Collector::start(
        &broker.bootstrap(),
        r#"
        [[routes]]
        name = "web"
        topic = "web.events"
        apps = ["web"]
        "#,
    );
    let dom = chromium(&format!("http://{}/demo.html?autoclick=1", c.addr));
    assert!(
        dom.contains("beacons sent: 2"),
        "tracker did not send two beacons; DOM:\n{dom}"
    );

    let got = values(&consume_all(&broker.bootstrap(), "web.events", 0, 2));
    let pv = got
        .iter()
        .find(|v| v["type"] == "page_view")
        .expect("a page view");
    let click = got.iter().find(|v| v["type"] == "click").expect("a click");
    for ev in [pv, click] {
        assert_eq!(ev["app"], "web");
        assert_eq!(ev["source"], "beacon");
        assert!(
            ev["page"]["url"]
                .as_str()
                .unwrap()
                .ends_with("/demo.html?autoclick=1"),
            "{ev}"
        );
        assert_eq!(ev["page"]["title"], "Qanat demo shop");
        assert!(ev["screen"].as_str().unwrap().contains('x'), "{ev}");
        assert!(!ev["language"].as_str().unwrap().is_empty(), "{ev}");
        assert_eq!(ev["client"]["browser"], "Chrome");
        assert_eq!(
            ev["client"]["crawler"], true,
            "HeadlessChrome is automation: {ev}"
        );
        assert_eq!(ev["client"]["ip"], "127.0.0.1");
        assert!(ev["received_ms"].as_i64().unwrap() > 0);
    }
    let vid = pv["visitor_id"].as_str().unwrap();
    assert_eq!(vid.len(), 32, "{pv}");
    assert_eq!(
        click["visitor_id"], vid,
        "page view and click are one visitor"
    );
    assert_eq!(click["spm"]["code"], "demo.home.hero.buy");
    assert_eq!(click["spm"]["c"], "hero");
    assert_eq!(click["params"]["text"], "Buy now");
}

#[test]
fn beacon_answers_pixel_or_204_uncached_and_sets_the_cookie_once() {
    let broker = Broker::start();
    let c = Collector::start(
        &broker.bootstrap(),
        "[[routes]]\nname = \"all\"\ntopic = \"beacons\"\n",
    );
    let r = c.get("/t.gif?t=page_view&url=https%3A%2F%2Fshop.example%2Fp%3Fspm%3Da.b.c.d&ref=https%3A%2F%2Fsearch.example%2F&spm=shop.item.list.7&uid=u-9&sr=390x844&lang=zh-CN&ts=1700000000000");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/gif"));
    assert!(r.body.starts_with(b"GIF89a") && r.body.len() == 43);
    assert!(r.header("cache-control").unwrap().contains("no-store"));
    let cookie = r.header("set-cookie").expect("visitor cookie set");
    let vid = cookie
        .strip_prefix("qvid=")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();

    // With the cookie: no new cookie, same visitor; resp=204 gives an empty answer.
    let r = http(
        &c.addr,
        "GET",
        "/t.gif?t=click&spm=shop.item.list.8&resp=204",
        &[
            ("Cookie", &format!("qvid={vid}")),
            ("Referer", "https://shop.example/p"),
        ],
        b"",
    );
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    assert_eq!(r.header("set-cookie"), None);
    assert!(r.header("cache-control").unwrap().contains("no-cache"));

    let got = values(&consume_all(&broker.bootstrap(), "beacons", 0, 2));
    let msgs = consume_all(&broker.bootstrap(), "beacons", 0, 2);
    assert!(
        msgs.iter()
            .all(|m| m.key.as_deref() == Some(vid.as_bytes())),
        "keyed by visitor id"
    );
    let pv = &got[0];
    assert_eq!(pv["page"]["url"], "https://shop.example/p?spm=a.b.c.d");
    assert_eq!(pv["page"]["referrer"], "https://search.example/");
    assert_eq!(
        pv["spm"],
        json!({"code":"shop.item.list.7","a":"shop","b":"item","c":"list","d":"7"})
    );
    assert_eq!(pv["user_id"], "u-9");
    assert_eq!(pv["screen"], "390x844");
    assert_eq!(pv["language"], "zh-CN");
    assert_eq!(pv["client_ts"], 1_700_000_000_000i64);
    assert_eq!(pv["visitor_id"], vid.as_str());
    // No url parameter: the Referer header is the page.
    assert_eq!(got[1]["page"]["url"], "https://shop.example/p");
    assert_eq!(got[1]["type"], "click");
}

#[test]
fn gzip_and_zstd_batches_land_keyed_by_device_with_enrichment() {
    let broker = Broker::start();
    let c = Collector::start(
        &broker.bootstrap(),
        r#"
        [server]
        trusted_proxies = ["127.0.0.1"]
        [[routes]]
        name = "pages"
        topic = "app.pages"
        events = ["page_view"]
        [[routes]]
        name = "rest"
        topic = "app.other"
        "#,
    );
    let batch = json!({
        "app": "shop-android",
        "device": {"id": "dev-42", "os": "Android", "model": "Pixel 8", "app_version": "5.2.0"},
        "user": {"id": "user-7"},
        "events": [
            {"type": "page_view", "ts": 1700000000001i64,
             "page": {"name": "item", "params": {"sku": "A1"}},
             "referrer_chain": ["search", "home"], "passthrough": {"campaign": "spring"}},
            {"type": "click", "page": {"name": "item"}, "control": "buy", "params": {"sku": "A1"}},
            {"type": "custom", "name": "video_play", "duration_ms": 1200,
             "properties": {"video": "v1"}, "page": {"name": "item"}},
            {"type": "exposure", "page": {"name": "home"},
             "items": [{"id": "A1", "count": 3}, {"id": "B2", "count": 1}]}
        ]
    });
    let ua = "ShopApp/5.2.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36";
    let body = serde_json::to_vec(&batch).unwrap();
    let r = c.post(
        "/v1/events",
        &[
            JSON,
            ("Content-Encoding", "gzip"),
            ("User-Agent", ua),
            ("X-Forwarded-For", "198.51.100.7"),
        ],
        &gzip(&body),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"accepted": 4, "shed": 0, "rejected": []}));
    let r = c.post(
        "/v1/events",
        &[JSON, ("Content-Encoding", "zstd"), ("User-Agent", ua)],
        &zstd::encode_all(&body[..], 3).unwrap(),
    );
    assert_eq!(r.json()["accepted"], 4, "{}", r.text());

    let pages = consume_all(&broker.bootstrap(), "app.pages", 0, 2);
    let other = consume_all(&broker.bootstrap(), "app.other", 0, 6);
    assert!(pages
        .iter()
        .chain(&other)
        .all(|m| m.key.as_deref() == Some(&b"dev-42"[..])));
    let pv = &values(&pages)[0];
    assert_eq!(pv["type"], "page_view");
    assert_eq!(pv["source"], "batch");
    assert_eq!(pv["user_id"], "user-7");
    assert_eq!(pv["client_ts"], 1_700_000_000_001i64);
    assert_eq!(pv["device"]["model"], "Pixel 8");
    assert_eq!(pv["event"]["referrer_chain"], json!(["search", "home"]));
    assert_eq!(pv["event"]["passthrough"]["campaign"], "spring");
    assert_eq!(
        pv["client"]["ip"], "198.51.100.7",
        "X-Forwarded-For from a trusted proxy"
    );
    assert_eq!(pv["client"]["os"], "Android");
    assert_eq!(pv["client"]["device"], "smartphone");
    assert_eq!(pv["client"]["crawler"], false);
    assert_eq!(values(&pages)[1]["client"]["ip"], "127.0.0.1");
    let types: Vec<Value> = values(&other).iter().map(|v| v["type"].clone()).collect();
    assert_eq!(
        types,
        json!(["click", "custom", "exposure", "click", "custom", "exposure"])
            .as_array()
            .unwrap()
            .clone()
    );
    let custom = &values(&other)[1];
    assert_eq!(custom["event"]["duration_ms"], 1200);
    assert_eq!(values(&other)[2]["event"]["items"][0]["count"], 3);
}

#[test]
fn malformed_inputs_get_4xx_and_the_server_stays_up() {
    let broker = Broker::start();
    let mut c = Collector::start(
        &broker.bootstrap(),
        r#"
        [server]
        max_body_bytes = 65536
        max_decoded_bytes = 262144
        max_event_bytes = 1024
        max_batch_events = 100
        [[routes]]
        name = "all"
        topic = "events"
        "#,
    );
    let ok_event = json!({"type": "custom", "name": "n"});
    let batch = |events: Value| {
        serde_json::to_vec(&json!({"app":"a","device":{"id":"d"},"events":events})).unwrap()
    };
    let cases: Vec<Case<'_>> = vec![
        ("bad JSON", vec![JSON], b"{\"app\":\"a\",\"events\":[".to_vec(), 400, "EOF"),
        ("not an object", vec![JSON], b"[1,2]".to_vec(), 400, "not a valid batch"),
        (
            "invalid UTF-8",
            vec![JSON],
            b"{\"app\":\"a\",\"device\":{\"id\":\"d\"},\"events\":[{\"type\":\"custom\",\"name\":\"\xff\xfe\"}]}".to_vec(),
            400,
            "",
        ),
        ("body over max_body_bytes", vec![JSON], vec![b' '; 100_000], 413, ""),
        (
            "gzip bomb over max_decoded_bytes",
            vec![JSON, ("Content-Encoding", "gzip")],
            gzip(&vec![b' '; 4 << 20]),
            413,
            "decoded",
        ),
        ("unknown encoding", vec![JSON, ("Content-Encoding", "br")], batch(json!([ok_event])), 415, "br"),
        ("not gzip", vec![JSON, ("Content-Encoding", "gzip")], batch(json!([ok_event])), 400, "gzip"),
        ("missing events", vec![JSON], br#"{"app":"a"}"#.to_vec(), 400, "events"),
        ("missing app", vec![JSON], br#"{"events":[]}"#.to_vec(), 400, "app"),
        ("empty events", vec![JSON], batch(json!([])), 400, "empty"),
        ("event without type", vec![JSON], batch(json!([{"name": "x"}])), 400, "type"),
        ("click without control", vec![JSON], batch(json!([{"type":"click","page":{"name":"p"}}])), 400, "control"),
        ("page view without page", vec![JSON], batch(json!([{"type":"page_view"}])), 400, "page"),
        (
            "no visitor id",
            vec![JSON],
            br#"{"app":"a","events":[{"type":"custom","name":"n"}]}"#.to_vec(),
            400,
            "visitor",
        ),
        ("event over max_event_bytes", vec![JSON], batch(json!([{"type":"custom","name":"x".repeat(2000)}])), 413, "bytes"),
        ("too many events", vec![JSON], batch(json!(vec![ok_event.clone(); 101])), 413, "at most 100"),
        (
            "device part over max_event_bytes (copied into every record)",
            vec![JSON],
            serde_json::to_vec(&json!({"app":"a","device":{"id":"d","pad":"x".repeat(2000)},"events":[ok_event]})).unwrap(),
            413,
            "device",
        ),
    ];
    for (what, headers, body, want, needle) in cases {
        let r = c.post("/v1/events", &headers, &body);
        assert_eq!(r.status, want, "{what}: {}", r.text());
        assert!(
            r.text().contains(needle),
            "{what}: reason {:?} lacks {needle:?}",
            r.text()
        );
        assert!(c.is_alive(), "collector died on {what}");
    }
    for (what, path) in [
        ("beacon without type", "/t.gif?url=x"),
        ("beacon with a bad spm", "/t.gif?t=click&spm=a..b"),
        (
            "beacon with a bad visitor id",
            "/t.gif?t=click&vid=%3Cscript%3E",
        ),
        ("beacon with a bad ts", "/t.gif?t=click&ts=soon"),
        ("config without app", "/v1/config"),
    ] {
        let r = c.get(path);
        assert_eq!(r.status, 400, "{what}: {}", r.text());
    }
    let r = http(
        &c.addr,
        "PUT",
        "/admin/v1/config?app=a",
        &[JSON],
        b"{\"events\":{\"x\":{\"sample\":7}}}",
    );
    assert_eq!(r.status, 400, "sample out of range: {}", r.text());

    // A partly bad batch keeps its valid events and names the bad ones.
    let r = c.post(
        "/v1/events",
        &[JSON],
        &batch(json!([ok_event, {"type":"click"}, ok_event])),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let reply = r.json();
    assert_eq!(reply["accepted"], 2);
    assert_eq!(reply["rejected"][0]["index"], 1);
    assert!(reply["rejected"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("control"));

    assert_eq!(c.get("/healthz").status, 200);
    assert!(c.is_alive());
    let got = consume_all(&broker.bootstrap(), "events", 0, 2);
    assert_eq!(got.len(), 2);
    assert_eq!(
        watermarks(&broker.bootstrap(), "events", 0).1,
        2,
        "nothing invalid was produced"
    );
    assert!(c.metric("qanat_collect_events_total", &[("outcome", "rejected")]) >= 16.0);
}

#[test]
fn a_flooded_route_does_not_stop_another() {
    let broker = Broker::start();
    // "bulk" produces to a broker address where nothing listens, with a one-message
    // librdkafka queue: it fills up and stays full, like a route whose topic cannot keep up.
    let c = Collector::start(
        &broker.bootstrap(),
        r#"
        [server]
        max_batch_events = 10
        retry_after_secs = 2
        [[routes]]
        name = "bulk"
        topic = "bulk.events"
        apps = ["bulk"]
        buffer = 10
        kafka = { "bootstrap.servers" = "127.0.0.1:1", "queue.buffering.max.messages" = "1" }
        [[routes]]
        name = "vip"
        topic = "vip.events"
        apps = ["vip"]
        buffer = 1000
        "#,
    );
    let batch = |app: &str| {
        let events: Vec<Value> = (0..10)
            .map(|i| json!({"type":"custom","name":format!("e{i}")}))
            .collect();
        serde_json::to_vec(&json!({"app": app, "device": {"id": "d1"}, "events": events})).unwrap()
    };
    // The pump takes the first batch off the buffer and gets stuck handing it to librdkafka;
    // then one more batch fills the buffer and the next is refused.
    let r = c.post("/v1/events", &[JSON], &batch("bulk"));
    assert_eq!(r.status, 200, "{}", r.text());
    poll_until("the bulk pump to take the first batch", DEADLINE, || {
        let buffered = c.get("/healthz").json()["routes"][0]["buffered"].clone();
        if buffered == 0 {
            Ok(())
        } else {
            Err(format!("buffered: {buffered}"))
        }
    });
    let r = c.post("/v1/events", &[JSON], &batch("bulk"));
    assert_eq!(r.status, 200, "{}", r.text());
    let full = c.post("/v1/events", &[JSON], &batch("bulk"));
    assert_eq!(full.status, 503, "{}", full.text());
    assert_eq!(full.header("retry-after"), Some("2"));
    assert!(full.text().contains("bulk"));
    let health = c.get("/healthz").json();
    assert_eq!(health["routes"][0]["buffered"], 10, "{health}");

    // The other route still takes and delivers events, several batches' worth.
    for _ in 0..5 {
        let r = c.post("/v1/events", &[JSON], &batch("vip"));
        assert_eq!(
            r.status,
            200,
            "vip refused while bulk is full: {}",
            r.text()
        );
        // Beacons to the full route are refused too, not dropped silently.
        assert_eq!(c.get("/t.gif?t=pv&app=bulk").status, 503);
    }
    let got = consume_all(&broker.bootstrap(), "vip.events", 0, 50);
    assert_eq!(got.len(), 50);
    assert!(
        c.metric(
            "qanat_collect_route_events_total",
            &[("route", "bulk"), ("outcome", "full")]
        ) >= 10.0
    );
}

#[test]
fn a_throttle_change_is_served_and_applied() {
    let broker = Broker::start();
    let base = r#"
        [[routes]]
        name = "all"
        topic = "events"
        [apps.web]
        min_priority = "low"
        [apps.web.events.click]
        priority = "low"
        sample = 1.0
        "#;
    let c = Collector::start(&broker.bootstrap(), base);
    let config = |c: &Collector| c.get("/v1/config?app=web").json();
    assert_eq!(config(&c)["events"]["click"]["sample"], 1.0);
    let v1 = config(&c)["version"].as_u64().unwrap();

    // Peak: shed clicks entirely.
    let r = http(
        &c.addr,
        "PUT",
        "/admin/v1/config?app=web",
        &[JSON],
        br#"{"events":{"click":{"priority":"low","sample":0.0}}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let now = config(&c);
    assert_eq!(now["events"]["click"]["sample"], 0.0, "{now}");
    assert!(now["version"].as_u64().unwrap() > v1);

    // An SDK that ignores the setting still sends clicks: the server drops and counts them.
    let mixed = |n: usize| {
        let mut events = Vec::new();
        for i in 0..n {
            events.push(json!({"type":"page_view","page":{"name":format!("p{i}")}}));
            events.push(json!({"type":"click","page":{"name":"p"},"control":format!("c{i}")}));
        }
        serde_json::to_vec(&json!({"app":"web","device":{"id":"d-1"},"events":events})).unwrap()
    };
    let r = c.post("/v1/events", &[JSON], &mixed(5));
    assert_eq!(r.json(), json!({"accepted": 5, "shed": 5, "rejected": []}));
    let r = c.get("/t.gif?t=click&app=web&spm=a.b.c.d");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-qanat-shed"), Some("sample"));
    assert_eq!(
        c.metric("qanat_collect_shed_total", &[("reason", "sample")]),
        6.0
    );

    // Priority shedding: everything below normal goes.
    let r = http(
        &c.addr,
        "PUT",
        "/admin/v1/config?app=web",
        &[JSON],
        br#"{"min_priority":"normal","events":{"click":{"priority":"low"}}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.post("/v1/events", &[JSON], &mixed(1)).json()["shed"], 1);
    assert_eq!(
        c.metric("qanat_collect_shed_total", &[("reason", "priority")]),
        1.0
    );

    // After the peak: the operator restores the file's settings with SIGHUP.
    let before = config(&c)["version"].as_u64().unwrap();
    std::fs::write(c.config_path(), base).unwrap();
    c.signal("-HUP");
    poll_until("the reload to show in /v1/config", DEADLINE, || {
        let version = config(&c)["version"].as_u64().unwrap();
        if version > before {
            Ok(())
        } else {
            Err(format!("version {version}"))
        }
    });
    assert_eq!(config(&c)["events"]["click"]["sample"], 1.0);
    assert_eq!(config(&c)["min_priority"], "low");
    assert_eq!(
        c.post("/v1/events", &[JSON], &mixed(5)).json()["accepted"],
        10
    );

    let got = values(&consume_all(&broker.bootstrap(), "events", 0, 16));
    let clicks = got.iter().filter(|v| v["type"] == "click").count();
    assert_eq!((got.len() - clicks, clicks), (11, 5));
    assert_eq!(
        watermarks(&broker.bootstrap(), "events", 0).1,
        16,
        "no shed event was produced"
    );
}

#[test]
fn sigterm_drains_every_accepted_event() {
    let broker = Broker::start();
    // A long linger keeps accepted events in the producer when SIGTERM arrives.
    let mut c = Collector::start(
        &broker.bootstrap(),
        r#"
        [[routes]]
        name = "all"
        topic = "drain"
        kafka = { "linger.ms" = "3000" }
        "#,
    );
    let mut accepted = 0;
    for b in 0..20 {
        let events: Vec<Value> = (0..50)
            .map(|i| json!({"type":"custom","name":format!("b{b}-{i}")}))
            .collect();
        let body =
            serde_json::to_vec(&json!({"app":"a","device":{"id":format!("d{b}")},"events":events}))
                .unwrap();
        let r = c.post("/v1/events", &[JSON], &body);
        accepted += r.json()["accepted"].as_u64().unwrap();
    }
    assert_eq!(accepted, 1000);
    let status = c.stop();
    assert!(
        status.success(),
        "collector exit {status}; stderr:\n{}",
        c.stderr()
    );
    assert!(c.stderr().contains("every accepted event delivered"));
    let got = consume_all(&broker.bootstrap(), "drain", 0, 1000);
    assert_eq!(got.len(), 1000);
    assert_eq!(watermarks(&broker.bootstrap(), "drain", 0).1, 1000);
}

#[test]
fn admin_through_a_proxy_needs_the_token() {
    let broker = Broker::start();
    let put = |c: &Collector, headers: &[(&str, &str)]| {
        http(
            &c.addr,
            "PUT",
            "/admin/v1/config?app=web",
            headers,
            br#"{"events":{"page_view":{"sample":0.0}}}"#,
        )
    };
    let sample =
        |c: &Collector| c.get("/v1/config?app=web").json()["events"]["page_view"]["sample"].clone();
    const XFF: (&str, &str) = ("X-Forwarded-For", "198.51.100.7");
    const ROUTES: &str = "[[routes]]\nname = \"all\"\ntopic = \"events\"\n";

    // Behind a reverse proxy on this host: every browser's request arrives from loopback.
    let c = Collector::start(
        &broker.bootstrap(),
        &format!("[server]\ntrusted_proxies = [\"127.0.0.1\"]\n{ROUTES}"),
    );
    for headers in [&[JSON, XFF][..], &[JSON][..]] {
        let r = put(&c, headers);
        assert_eq!(r.status, 403, "{headers:?}: {}", r.text());
    }
    assert_ne!(sample(&c), 0.0, "sampling unchanged");

    // No trusted proxy configured: a forwarding header still says a proxy is in between;
    // a direct local request keeps working without a token.
    let c = Collector::start(&broker.bootstrap(), ROUTES);
    let r = put(&c, &[JSON, ("Forwarded", "for=198.51.100.7")]);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_ne!(sample(&c), 0.0);
    let r = put(&c, &[JSON]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sample(&c), 0.0);

    // With admin_token: through the proxy with the token, yes; without it, no.
    let c = Collector::start(
        &broker.bootstrap(),
        &format!("[server]\ntrusted_proxies = [\"127.0.0.1\"]\nadmin_token = \"s3cret\"\n{ROUTES}"),
    );
    let r = put(&c, &[JSON, XFF, ("Authorization", "Bearer guess")]);
    assert_eq!(r.status, 401, "{}", r.text());
    let r = put(&c, &[JSON, XFF]);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_ne!(sample(&c), 0.0);
    let r = put(&c, &[JSON, XFF, ("Authorization", "Bearer s3cret")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sample(&c), 0.0);
}

const BEACON: &str = "/t.gif?t=page_view&app=web&url=https%3A%2F%2Fshop.example%2F";

/// Read until the server closes `s` (EOF or reset); panics if it is still open at the deadline.
fn closed_by_server(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => got,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => got,
        Err(e) => panic!("connection not closed by the server: {e}"),
    }
}

#[test]
fn one_connection_mixes_pipelined_beacons_and_other_requests_in_order() {
    let broker = Broker::start();
    let c = Collector::start(
        &broker.bootstrap(),
        "[[routes]]\nname = \"all\"\ntopic = \"beacons\"\n",
    );
    let beacon = |t: &str, extra: &str| {
        format!("GET /t.gif?t={t}&app=web&vid=v-{t} HTTP/1.1\r\nHost: x\r\n{extra}\r\n")
    };
    // Beacons answered on the fast path, a request it leaves (the router's health check),
    // then beacons hyper answers for the rest of the connection, one of them HTTP/1.0: all
    // in one write, pipelined.
    let wire = [
        beacon("a", ""),
        beacon("b", "Cookie: qvid=v-b\r\n"),
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        beacon("c", ""),
        "GET /t.gif?t=d&app=web&vid=v-d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".to_string(),
        beacon("e", "Connection: close\r\n"),
    ]
    .concat();
    let mut s = TcpStream::connect(&c.addr).unwrap();
    s.write_all(wire.as_bytes()).unwrap();
    let got = responses(&closed_by_server(&mut s)).unwrap();
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200; 6], "{got:?}");
    assert_eq!(got[2].json()["status"], "ok", "{got:?}");
    // The fast path's pixel answers carry what hyper's do.
    for r in [&got[0], &got[3]] {
        assert_eq!(r.header("content-type"), Some("image/gif"));
        assert_eq!(r.header("cache-control"), got[0].header("cache-control"));
        assert_eq!(r.header("pragma"), Some("no-cache"));
        assert_eq!(r.header("expires"), Some("0"));
        assert!(r.header("date").is_some());
        assert_eq!(r.body.len(), 43);
        assert!(r.header("set-cookie").unwrap().starts_with("qvid=v-"));
    }
    assert_eq!(got[1].header("set-cookie"), None, "the cookie was sent");
    let keys: Vec<Vec<u8>> = consume_all(&broker.bootstrap(), "beacons", 0, 5)
        .into_iter()
        .map(|m| m.key.unwrap())
        .collect();
    assert_eq!(keys, [&b"v-a"[..], b"v-b", b"v-c", b"v-d", b"v-e"]);
}

#[test]
fn slow_header_connections_are_closed_and_beacons_keep_flowing() {
    let broker = Broker::start();
    let c = Collector::start(
        &broker.bootstrap(),
        "[server]\nheader_read_timeout_ms = 500\n[[routes]]\nname = \"all\"\ntopic = \"beacons\"\n",
    );
    // Connections that start a request and never finish its headers, or send nothing.
    let mut slow: Vec<TcpStream> = (0..40)
        .map(|i| {
            let mut s = TcpStream::connect(&c.addr).unwrap();
            if i % 2 == 0 {
                s.write_all(b"GET /t.gif?t=page_view HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
            }
            s
        })
        .collect();
    // One that trickles a header byte at a time: the deadline is for the whole head, so the
    // server closes it too (writes start failing).
    let addr = c.addr.clone();
    let trickler = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /t.gif?t=page_view HTTP/1.1\r\nX-Slow: ")
            .unwrap();
        let pace = Duration::from_millis(50);
        for _ in 0..(DEADLINE.as_millis() / pace.as_millis()) {
            if s.write_all(b"a").is_err() {
                return true;
            }
            std::thread::sleep(pace);
        }
        false
    });
    for s in &mut slow {
        let answer = closed_by_server(s);
        assert!(
            !answer.starts_with(b"HTTP/1.1 2"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert!(
        trickler.join().unwrap(),
        "the trickling connection was never closed"
    );
    let r = c.get(BEACON);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(consume_all(&broker.bootstrap(), "beacons", 0, 1).len(), 1);
}

#[test]
fn a_connection_flood_at_the_descriptor_limit_does_not_stop_service() {
    let broker = Broker::start();
    let c = Collector::start(
        &broker.bootstrap(),
        "[server]\nheader_read_timeout_ms = 120000\n[[routes]]\nname = \"all\"\ntopic = \"beacons\"\n",
    );
    // One beacon first, so the route's producer is connected before descriptors run out.
    assert_eq!(c.get(BEACON).status, 200);
    assert_eq!(consume_all(&broker.bootstrap(), "beacons", 0, 1).len(), 1);
    let limit = c.limit_open_files(16);

    // Far more idle connections than descriptors left (fewer than the listen backlog of 128):
    // accepting fails with EMFILE.
    let flood: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(&c.addr).unwrap())
        .collect();
    poll_until(
        &format!("the collector to run out of descriptors (limit {limit})"),
        DEADLINE,
        || {
            if c.stderr().contains("accepting connections failed") {
                Ok(())
            } else {
                Err("no accept failure logged yet".to_string())
            }
        },
    );
    drop(flood);

    // Once the flood is gone, beacons are served again.
    let r = poll_until("a beacon to be served again", DEADLINE, || {
        match try_http(&c.addr, "GET", BEACON, &[], b"") {
            Ok(r) if r.status == 200 => Ok(r),
            Ok(r) => Err(format!("status {}", r.status)),
            Err(e) => Err(e),
        }
    });
    assert_eq!(r.header("content-type"), Some("image/gif"));
    assert_eq!(consume_all(&broker.bootstrap(), "beacons", 0, 2).len(), 2);
    // One line per interval, not one per failed accept.
    let logged = c.stderr().matches("accepting connections failed").count();
    assert!(logged <= 3, "{logged} accept-failure lines");
}
