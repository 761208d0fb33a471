//! Table addresses: `mysql://user:pass@host:3306/db.table` (also `mariadb://`),
//! `postgres://user:pass@host:5432/db/schema.table` (schema `public` when omitted; also
//! `postgresql://`), `parquet:///dir/table?ds=20261129` (Hive partition `ds=…` under the
//! table directory), `file:///dir/name.csv` (see `files`), `kafka://host:9092/topic?…` (see
//! `bus`).

use std::path::PathBuf;

use crate::SyncError;

/// Where to connect to a database server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: String,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub database: String,
}

/// A table address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Mysql {
        server: Server,
        table: String,
    },
    Postgres {
        server: Server,
        schema: String,
        table: String,
    },
    Parquet {
        dir: PathBuf,
        /// `(key, value)` of the Hive partition directory.
        partition: Option<(String, String)>,
    },
    /// A delimited data file and its verification file.
    File(crate::files::FileSpec),
    /// A topic (range) on the bus.
    Bus(crate::bus::BusSpec),
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("truncated %-escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad %-escape %{hex}"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "%-escapes are not UTF-8".to_string())
}

fn bad(dsn: &str, reason: impl Into<String>) -> SyncError {
    SyncError::Dsn {
        dsn: redact(dsn),
        reason: reason.into(),
    }
}

/// The DSN with its password masked, for messages.
pub fn redact(dsn: &str) -> String {
    let Some((scheme, rest)) = dsn.split_once("://") else {
        return dsn.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..]),
            None => dsn.to_string(),
        },
        None => dsn.to_string(),
    }
}

impl Endpoint {
    pub fn parse(dsn: &str) -> Result<Endpoint, SyncError> {
        let (scheme, rest) = dsn.split_once("://").ok_or_else(|| {
            bad(
                dsn,
                "expected SCHEME://… (mysql, postgres, parquet, file or kafka)",
            )
        })?;
        match scheme {
            "mysql" | "mariadb" => {
                let (server, path) = parse_server(dsn, rest)?;
                let (db, table) = path
                    .split_once('.')
                    .ok_or_else(|| bad(dsn, "expected /database.table after the host"))?;
                if db.is_empty() || table.is_empty() || table.contains('.') {
                    return Err(bad(dsn, "expected /database.table after the host"));
                }
                Ok(Endpoint::Mysql {
                    server: Server {
                        database: db.to_string(),
                        ..server
                    },
                    table: table.to_string(),
                })
            }
            "postgres" | "postgresql" => {
                let (server, path) = parse_server(dsn, rest)?;
                let (db, qualified) = path
                    .split_once('/')
                    .ok_or_else(|| bad(dsn, "expected /database/schema.table after the host"))?;
                let (schema, table) = match qualified.split_once('.') {
                    Some((s, t)) => (s, t),
                    None => ("public", qualified),
                };
                if db.is_empty() || schema.is_empty() || table.is_empty() || table.contains('.') {
                    return Err(bad(dsn, "expected /database/schema.table after the host"));
                }
                Ok(Endpoint::Postgres {
                    server: Server {
                        database: db.to_string(),
                        ..server
                    },
                    schema: schema.to_string(),
                    table: table.to_string(),
                })
            }
            "parquet" => {
                let (path, query) = match rest.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (rest, None),
                };
                if !path.starts_with('/') || path.len() < 2 {
                    return Err(bad(dsn, "expected parquet:///absolute/table/dir"));
                }
                let partition = match query {
                    None | Some("") => None,
                    Some(q) => {
                        let (k, v) = q
                            .split_once('=')
                            .ok_or_else(|| bad(dsn, "expected ?key=value (e.g. ?ds=20261129)"))?;
                        let ok = |s: &str| {
                            !s.is_empty()
                                && s.bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
                                && s != "."
                                && s != ".."
                        };
                        if !ok(k) || !ok(v) || q.contains('&') {
                            return Err(bad(
                                dsn,
                                "partition key and value must be [A-Za-z0-9_.-]+",
                            ));
                        }
                        Some((k.to_string(), v.to_string()))
                    }
                };
                Ok(Endpoint::Parquet {
                    dir: PathBuf::from(percent_decode(path).map_err(|r| bad(dsn, r))?),
                    partition,
                })
            }
            "file" => {
                let (path, query) = match rest.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (rest, None),
                };
                if !path.starts_with('/') || path.len() < 2 || path.ends_with('/') {
                    return Err(bad(dsn, "expected file:///absolute/path/name.csv"));
                }
                let path = PathBuf::from(percent_decode(path).map_err(|r| bad(dsn, r))?);
                crate::files::FileSpec::from_parts(path, query)
                    .map(Endpoint::File)
                    .map_err(|r| bad(dsn, r))
            }
            "kafka" => {
                let (addr, query) = match rest.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (rest, None),
                };
                let (brokers, topic) = addr
                    .split_once('/')
                    .ok_or_else(|| bad(dsn, "expected kafka://host:port/topic"))?;
                crate::bus::BusSpec::from_parts(brokers, topic, query)
                    .map(Endpoint::Bus)
                    .map_err(|r| bad(dsn, r))
            }
            other => Err(bad(
                dsn,
                format!(
                    "unknown scheme {other:?} (expected mysql, postgres, parquet, file or kafka)"
                ),
            )),
        }
    }

    /// The table as a user names it.
    pub fn describe(&self) -> String {
        match self {
            Endpoint::Mysql { server, table } => {
                format!(
                    "mysql {}:{}/{}.{table}",
                    server.host,
                    server.port.unwrap_or(3306),
                    server.database
                )
            }
            Endpoint::Postgres {
                server,
                schema,
                table,
            } => format!(
                "postgres {}:{}/{}/{schema}.{table}",
                server.host,
                server.port.unwrap_or(5432),
                server.database
            ),
            Endpoint::Parquet { dir, partition } => match partition {
                Some((k, v)) => format!("parquet {}/{k}={v}", dir.display()),
                None => format!("parquet {}", dir.display()),
            },
            Endpoint::File(spec) => format!("file {}", spec.path.display()),
            Endpoint::Bus(spec) => spec.describe(),
        }
    }
}

fn parse_server<'a>(dsn: &str, rest: &'a str) -> Result<(Server, &'a str), SyncError> {
    let (authority, path) = rest
        .split_once('/')
        .ok_or_else(|| bad(dsn, "missing the /database… part"))?;
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(u) => match u.split_once(':') {
            Some((u, p)) => (
                Some(percent_decode(u).map_err(|r| bad(dsn, r))?),
                Some(percent_decode(p).map_err(|r| bad(dsn, r))?),
            ),
            None => (Some(percent_decode(u).map_err(|r| bad(dsn, r))?), None),
        },
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => {
            let port: u16 = p
                .parse()
                .map_err(|_| bad(dsn, format!("port {p:?} is not a number in 1..65535")))?;
            if port == 0 {
                return Err(bad(dsn, "port 0"));
            }
            (h, Some(port))
        }
        _ => (hostport, None),
    };
    if host.is_empty() {
        return Err(bad(dsn, "missing host"));
    }
    Ok((
        Server {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            user,
            password,
            database: String::new(),
        },
        path,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme() {
        let m = Endpoint::parse("mysql://u:p%40ss@h:3307/shop.orders");
        assert!(matches!(&m, Ok(Endpoint::Mysql { server, table })
            if server.password.as_deref() == Some("p@ss") && server.port == Some(3307)
            && server.database == "shop" && table == "orders"));
        let p = Endpoint::parse("postgres://u@h/dw/public.orders");
        assert!(matches!(&p, Ok(Endpoint::Postgres { schema, table, .. })
            if schema == "public" && table == "orders"));
        let q = Endpoint::parse("parquet:///lake/orders?ds=20261129");
        assert!(
            matches!(&q, Ok(Endpoint::Parquet { partition: Some((k, v)), .. })
            if k == "ds" && v == "20261129")
        );
    }

    #[test]
    fn bad_dsns_say_what_is_wrong() {
        for (dsn, needle) in [
            ("mysql://h:99999/a.b", "port"),
            ("mysql://h:3306/shop", "database.table"),
            ("oracle://h/x", "unknown scheme"),
            ("postgres://h:5432/dw", "database/schema.table"),
            ("parquet://rel/dir", "absolute"),
            ("parquet:///lake/t?ds=../x", "partition"),
            ("nothing", "SCHEME"),
            ("file://rel/o.csv", "absolute"),
            ("file:///d/o.csv?format=xml", "format"),
        ] {
            let err = Endpoint::parse(dsn).map(|_| ()).map_err(|e| e.to_string());
            assert!(
                matches!(&err, Err(e) if e.contains(needle)),
                "{dsn}: {err:?}"
            );
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("mysql://u:secret@h/db.t"), "mysql://u:***@h/db.t");
    }

    proptest::proptest! {
        #[test]
        fn parsing_garbage_never_panics(s in ".{0,80}") {
            let _ = Endpoint::parse(&s);
            let _ = redact(&s);
        }
    }
}
