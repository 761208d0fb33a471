//! Parsing the trajectory headers of one data record (docs/trajectory.md).

use crate::AuditError;

pub const HOST: &str = "qanat.host";
pub const FILE: &str = "qanat.file";
pub const PATH: &str = "qanat.path";
pub const OFFSET: &str = "qanat.offset";
pub const SIZE: &str = "qanat.size";
pub const LINES: &str = "qanat.lines";

/// One record header as it came off the wire: name and value are untrusted bytes.
pub type RawHeader<'a> = (&'a [u8], Option<&'a [u8]>);

/// The trajectory of one record: which bytes of which file it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trajectory {
    pub host: String,
    pub file: String,
    /// `None` when the header is absent: the path is informational only.
    pub path: Option<String>,
    pub offset: u64,
    pub size: u64,
    /// `None` when absent: the audit checks bytes, not lines.
    pub lines: Option<u64>,
}

impl Trajectory {
    /// End of the covered range; [`Trajectory::parse`] guarantees it does not overflow.
    pub fn end(&self) -> u64 {
        self.offset + self.size
    }

    /// Parse the trajectory headers. `qanat.host`, `qanat.file`, `qanat.offset` and
    /// `qanat.size` are required; `qanat.path` and `qanat.lines` are optional but must be valid
    /// when present. Other headers (static attributes) are ignored. When a header repeats, the
    /// last one wins, as with Kafka header lookups in most clients.
    pub fn parse(headers: &[RawHeader<'_>]) -> Result<Trajectory, AuditError> {
        let find = |name: &'static str| -> Result<Option<&str>, AuditError> {
            match headers.iter().rev().find(|(n, _)| *n == name.as_bytes()) {
                None => Ok(None),
                Some((_, None)) => Err(AuditError::Header {
                    name,
                    reason: "null value".into(),
                }),
                Some((_, Some(v))) => {
                    std::str::from_utf8(v)
                        .map(Some)
                        .map_err(|_| AuditError::Header {
                            name,
                            reason: "not UTF-8".into(),
                        })
                }
            }
        };
        let required = |name: &'static str| -> Result<&str, AuditError> {
            match find(name)? {
                Some(v) if !v.is_empty() => Ok(v),
                Some(_) => Err(AuditError::Header {
                    name,
                    reason: "empty".into(),
                }),
                None => Err(AuditError::Header {
                    name,
                    reason: "missing".into(),
                }),
            }
        };
        let number = |name: &'static str, v: &str| -> Result<u64, AuditError> {
            // Plain decimal only: no sign, no spaces, no hex.
            if !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(AuditError::Header {
                    name,
                    reason: format!("not a decimal number: {:?}", truncate(v)),
                });
            }
            v.parse::<u64>().map_err(|_| AuditError::Header {
                name,
                reason: format!("out of range: {:?}", truncate(v)),
            })
        };
        let host = required(HOST)?.to_string();
        let file = required(FILE)?.to_string();
        let offset = number(OFFSET, required(OFFSET)?)?;
        let size = number(SIZE, required(SIZE)?)?;
        if offset.checked_add(size).is_none() {
            return Err(AuditError::Header {
                name: SIZE,
                reason: "offset + size overflows".into(),
            });
        }
        let path = find(PATH)?.map(str::to_string);
        let lines = find(LINES)?.map(|v| number(LINES, v)).transpose()?;
        Ok(Trajectory {
            host,
            file,
            path,
            offset,
            size,
            lines,
        })
    }
}

/// Keep garbage quoted in reasons short.
fn truncate(v: &str) -> String {
    v.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn h<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<RawHeader<'a>> {
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes(), Some(v.as_bytes())))
            .collect()
    }

    #[test]
    fn parses_the_contract_headers() {
        let t = Trajectory::parse(&h(&[
            ("qanat.host", "web7"),
            ("qanat.file", "web7:2049:131075:9a1b2c3d-1024"),
            ("qanat.path", "/var/log/app.log"),
            ("qanat.offset", "100"),
            ("qanat.size", "42"),
            ("qanat.lines", "1"),
            ("env", "prod"),
        ]))
        .unwrap();
        assert_eq!(t.offset, 100);
        assert_eq!(t.end(), 142);
        assert_eq!(t.path.as_deref(), Some("/var/log/app.log"));
        assert_eq!(t.lines, Some(1));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let base = [
            ("qanat.host", "h"),
            ("qanat.file", "f"),
            ("qanat.offset", "0"),
            ("qanat.size", "1"),
        ];
        assert!(Trajectory::parse(&h(&base)).is_ok());
        for bad in [
            ("qanat.offset", "-1"),
            ("qanat.offset", "1e3"),
            ("qanat.offset", " 1"),
            ("qanat.size", "99999999999999999999999"),
            ("qanat.offset", "18446744073709551615"),
            ("qanat.host", ""),
            ("qanat.lines", "x"),
        ] {
            let mut v = h(&base);
            v.push((bad.0.as_bytes(), Some(bad.1.as_bytes())));
            assert!(Trajectory::parse(&v).is_err(), "{bad:?}");
        }
        assert!(Trajectory::parse(&[]).is_err());
        assert!(Trajectory::parse(&[(b"qanat.host", None)]).is_err());
        assert!(Trajectory::parse(&[(b"qanat.host", Some(&[0xff, 0xfe]))]).is_err());
    }
}
