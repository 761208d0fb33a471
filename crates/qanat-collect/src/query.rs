//! A beacon's query string, read in one pass.
//!
//! Invariants:
//! * Names and values are decoded exactly as `serde_urlencoded` (axum's `Query`) decodes
//!   `application/x-www-form-urlencoded` pairs: `+` is a space, `%XX` a byte (a `%` not
//!   followed by two hex digits stays as it is), bytes that are not UTF-8 become U+FFFD, empty
//!   pairs are skipped and a pair without `=` has an empty value.
//! * A name given twice keeps its last value, as in a map.
//! * Whatever needs no decoding is borrowed from the query; values of names a beacon does not
//!   read are not decoded at all.

use std::borrow::Cow;

/// The query parameters a beacon reads (besides `p_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Type,
    App,
    Url,
    Ref,
    Spm,
    Vid,
    Uid,
    Screen,
    Lang,
    Title,
    Ts,
    Event,
    Resp,
}

impl Field {
    pub const ALL: [Field; 13] = [
        Field::Type,
        Field::App,
        Field::Url,
        Field::Ref,
        Field::Spm,
        Field::Vid,
        Field::Uid,
        Field::Screen,
        Field::Lang,
        Field::Title,
        Field::Ts,
        Field::Event,
        Field::Resp,
    ];

    /// Its name in the query string.
    pub fn name(self) -> &'static str {
        match self {
            Field::Type => "t",
            Field::App => "app",
            Field::Url => "url",
            Field::Ref => "ref",
            Field::Spm => "spm",
            Field::Vid => "vid",
            Field::Uid => "uid",
            Field::Screen => "sr",
            Field::Lang => "lang",
            Field::Title => "title",
            Field::Ts => "ts",
            Field::Event => "e",
            Field::Resp => "resp",
        }
    }

    fn of(name: &str) -> Option<Field> {
        Some(match name {
            "t" => Field::Type,
            "app" => Field::App,
            "url" => Field::Url,
            "ref" => Field::Ref,
            "spm" => Field::Spm,
            "vid" => Field::Vid,
            "uid" => Field::Uid,
            "sr" => Field::Screen,
            "lang" => Field::Lang,
            "title" => Field::Title,
            "ts" => Field::Ts,
            "e" => Field::Event,
            "resp" => Field::Resp,
            _ => return None,
        })
    }
}

/// What a beacon reads of its query string.
#[derive(Debug, Default)]
pub struct BeaconQuery<'q> {
    /// The last value of each [`Field`], by its position in [`Field::ALL`].
    fields: [Option<Cow<'q, str>>; Field::ALL.len()],
    /// `p_*` pairs (names with their prefix), in query order.
    params: Vec<(Cow<'q, str>, Cow<'q, str>)>,
}

impl<'q> BeaconQuery<'q> {
    pub fn parse(query: &'q str) -> BeaconQuery<'q> {
        let mut q = BeaconQuery::default();
        let bytes = query.as_bytes();
        // Pairs cut at `&`, names at the first `=`, found with `memchr` (vectorised) rather
        // than a byte loop. `&` and `=` are ASCII, so the cuts are on char boundaries.
        let mut start = 0;
        while start < bytes.len() {
            let rest = bytes.get(start..).unwrap_or_default();
            let end = memchr::memchr(b'&', rest).map_or(bytes.len(), |i| start + i);
            let pair = bytes.get(start..end).unwrap_or_default();
            let eq = memchr::memchr(b'=', pair).map(|i| start + i);
            let (k, v) = match eq {
                Some(eq) => (
                    query.get(start..eq).unwrap_or(""),
                    query.get(eq + 1..end).unwrap_or(""),
                ),
                None => (query.get(start..end).unwrap_or(""), ""),
            };
            start = end + 1;
            if k.is_empty() && eq.is_none() {
                continue;
            }
            // `form_decode` borrows what has nothing to decode; values of other names are
            // not looked at.
            let name = form_decode(k);
            if let Some(f) = Field::of(&name) {
                if let Some(slot) = q.fields.get_mut(f as usize) {
                    *slot = Some(form_decode(v));
                }
            } else if name.starts_with("p_") {
                q.params.push((name, form_decode(v)));
            }
        }
        q
    }

    /// The last value of `f`, if given.
    pub fn get(&self, f: Field) -> Option<&str> {
        self.fields.get(f as usize)?.as_deref()
    }

    /// `p_*` pairs (names with their prefix), in query order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// One form-encoded name or value, decoded (borrowed when there is nothing to decode).
pub fn form_decode(s: &str) -> Cow<'_, str> {
    let bytes = s.as_bytes();
    let Some(first) = bytes.iter().position(|&b| b == b'+' || b == b'%') else {
        return Cow::Borrowed(s);
    };
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(bytes.get(..first).unwrap_or_default());
    let mut i = first;
    while let Some(&b) = bytes.get(i) {
        i += 1;
        match b {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i).copied().and_then(hex),
                bytes.get(i + 1).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            _ => out.push(b),
        }
    }
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// What axum's `Query` makes of `query`.
    fn axum_query(query: &str) -> HashMap<String, String> {
        let uri: axum::http::Uri = format!("/t.gif?{query}").parse().unwrap();
        axum::extract::Query::<HashMap<String, String>>::try_from_uri(&uri)
            .unwrap()
            .0
    }

    fn check_against_axum(query: &str) {
        let want = axum_query(query);
        let got = BeaconQuery::parse(query);
        for f in Field::ALL {
            assert_eq!(
                got.get(f),
                want.get(f.name()).map(String::as_str),
                "{query}: {f:?}"
            );
        }
        // The last value of each `p_*` name is the map's.
        let mut params = HashMap::new();
        for (k, v) in got.params() {
            params.insert(k.to_string(), v.to_string());
        }
        let want_params: HashMap<_, _> = want
            .into_iter()
            .filter(|(k, _)| k.starts_with("p_"))
            .collect();
        assert_eq!(params, want_params, "{query}");
    }

    #[test]
    fn decoding_matches_axum_query() {
        for query in [
            "t=page_view&app=web&url=https%3A%2F%2Fshop.example%2Fitem%3Fid%3D42&resp=204",
            "a=1&a=2&&b&=c&d=x+y%20z&e=%zz%4&f=%C3%A9%FF&g=%e2%82%ac&h==",
            "p_x=1&p_=2&p_y=%41&p_x=3&q",
            "t=a&t=b&%74=c&app&url=%&ref=%2&title=%%41+&p%5Fz=9",
            "",
        ] {
            check_against_axum(query);
        }
    }

    proptest! {
        #[test]
        fn any_query_decodes_as_axum_query_does(
            pairs in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("t".to_string()), Just("url".to_string()), Just("p_a".to_string()),
                        Just("%74".to_string()), Just("p_".to_string()), "[a-z_%+0-9]{0,4}",
                    ],
                    "[ -~]{0,12}|[a-f0-9%+\u{e9}]{0,12}",
                ),
                0..8,
            )
        ) {
            // Characters a URI cannot carry raw are escaped, as a browser sends them.
            let enc = |s: &str| s.replace(' ', "+").replace('#', "%23").replace('&', "%26")
                .replace(|c: char| !c.is_ascii() || c.is_ascii_control() || "\"<>\\^`{|}".contains(c), "%C3%A9");
            let query = pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&");
            check_against_axum(&query);
        }

        #[test]
        fn any_bytes_decode_without_panicking(s in "\\PC{0,40}") {
            let q = BeaconQuery::parse(&s);
            let _ = q.get(Field::Url);
            let _ = q.params().count();
        }
    }
}
