//! Feed arbitrary bytes to the pgoutput decoder of the PostgreSQL CDC source: it must never
//! panic, and the text values of any tuple it accepts must decode (or be refused) as every
//! column type without panicking either.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use qanat_cdc::postgres::pgoutput::{self, Datum, Message, OldTuple, Tuple};
use qanat_cdc::postgres::types::{decode_text, PgType};

const TYPE_OIDS: [u32; 16] = [
    16, 17, 20, 700, 1700, 25, 1082, 1083, 1266, 1114, 1184, 3802, 1007, 1009, 1020, 1185,
];

fn values(tuple: &Tuple) {
    for datum in &tuple.0 {
        if let Datum::Text(bytes) = datum {
            if let Ok(text) = std::str::from_utf8(bytes) {
                for oid in TYPE_OIDS {
                    if let Some(ty) = PgType::builtin(oid) {
                        let _ = decode_text(&ty, text);
                    }
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match pgoutput::decode(&Bytes::copy_from_slice(data)) {
        Ok(Message::Insert { new, .. }) => values(&new),
        Ok(Message::Update(u)) => {
            if let Some(OldTuple::Key(t) | OldTuple::Full(t)) = &u.old {
                values(t);
            }
            values(&u.new);
        }
        Ok(Message::Delete(d)) => {
            let (OldTuple::Key(t) | OldTuple::Full(t)) = &d.old;
            values(t);
        }
        _ => {}
    }
});
