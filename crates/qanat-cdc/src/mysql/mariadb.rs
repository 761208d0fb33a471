//! The MariaDB events `mysql_common` does not model (SYSTEM.md E3): the GTID event (type 162)
//! is decoded here; annotate rows (160), binlog checkpoint (161) and GTID list (163) carry
//! nothing a change stream needs and are skipped. MariaDB sends them only to a replica that
//! declares `@mariadb_slave_capability=4`; older capabilities get them rewritten as fake
//! `BEGIN` queries without the GTID.

pub const ANNOTATE_ROWS: u8 = 160;
pub const BINLOG_CHECKPOINT: u8 = 161;
pub const GTID: u8 = 162;
pub const GTID_LIST: u8 = 163;
/// 164 START_ENCRYPTION, 165 QUERY_COMPRESSED, 166–171 compressed rows events.
pub const FIRST_UNSUPPORTED: u8 = 164;
pub const LAST_UNSUPPORTED: u8 = 171;

/// The group is a single statement (DDL, non-transactional), without BEGIN/COMMIT.
const FL_STANDALONE: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MariaGtid {
    pub domain: u32,
    pub server_id: u32,
    pub seq_no: u64,
    pub standalone: bool,
}

impl MariaGtid {
    /// `D-S-N`, as `@@gtid_binlog_pos` and `@slave_connect_state` write it.
    pub fn text(&self) -> String {
        format!("{}-{}-{}", self.domain, self.server_id, self.seq_no)
    }
}

/// Decode a GTID event's body (after the common header): seq_no u64, domain u32, flags u8,
/// then optional fields this reader does not need. `None` when the body is too short.
pub fn parse_gtid(body: &[u8], server_id: u32) -> Option<MariaGtid> {
    let seq_no = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let domain = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    let flags = *body.get(12)?;
    Some(MariaGtid {
        domain,
        server_id,
        seq_no,
        standalone: flags & FL_STANDALONE != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtid_body() {
        let mut body = 42u64.to_le_bytes().to_vec();
        body.extend_from_slice(&7u32.to_le_bytes());
        body.push(FL_STANDALONE);
        let gtid = parse_gtid(&body, 3);
        assert_eq!(
            gtid,
            Some(MariaGtid {
                domain: 7,
                server_id: 3,
                seq_no: 42,
                standalone: true
            })
        );
        assert_eq!(gtid.map(|g| g.text()).as_deref(), Some("7-3-42"));
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            let parsed = parse_gtid(&body, 1);
            proptest::prop_assert_eq!(parsed.is_some(), body.len() >= 13);
        }
    }
}
