//! The consumer-group APIs. Their handlers live with the coordinator in
//! [`crate::groups`]; this module holds the versions served.

use std::ops::RangeInclusive;

pub const FIND_COORDINATOR: RangeInclusive<i16> = 0..=4;
pub const JOIN_GROUP: RangeInclusive<i16> = 0..=9;
pub const SYNC_GROUP: RangeInclusive<i16> = 0..=5;
pub const HEARTBEAT: RangeInclusive<i16> = 0..=4;
pub const LEAVE_GROUP: RangeInclusive<i16> = 0..=5;
/// OffsetCommit/OffsetFetch 9+ belong to the KIP-848 protocol, 10+ use topic ids.
pub const OFFSET_COMMIT: RangeInclusive<i16> = 2..=8;
pub const OFFSET_FETCH: RangeInclusive<i16> = 1..=8;
pub const LIST_GROUPS: RangeInclusive<i16> = 0..=4;
pub const DESCRIBE_GROUPS: RangeInclusive<i16> = 0..=5;
pub const DELETE_GROUPS: RangeInclusive<i16> = 0..=2;
