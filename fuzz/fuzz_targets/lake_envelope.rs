//! Feed arbitrary bytes to the lake's record decoders (`qanat lake land`'s CDC envelope and
//! JSON object inputs): they must never panic, and every row they accept must go into Arrow
//! builders, with inferred and with configured column types, without panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qanat_lake::land::{decode_cdc, decode_json, Decoded};
use qanat_lake::schema::{infer_columns, ColumnType, DataBuilders, MetaBuilders, RowMeta};

const CONFIGURED: [ColumnType; 7] = [
    ColumnType::Timestamp,
    ColumnType::Date,
    ColumnType::Decimal { precision: 10, scale: 2 },
    ColumnType::Int64,
    ColumnType::Float64,
    ColumnType::Bool,
    ColumnType::String,
];

fn append(d: &Decoded<'_>) {
    let configured: Vec<(String, ColumnType)> = d
        .image
        .0
        .iter()
        .zip(CONFIGURED.iter().cycle())
        .map(|((name, _), ty)| (name.to_string(), *ty))
        .collect();
    for configured in [&[][..], &configured[..]] {
        let mut data = DataBuilders::new(infer_columns(&d.image, configured));
        let _ = data.append(&d.image);
        let _ = data.finish();
    }
    let mut meta = MetaBuilders::default();
    meta.append(&RowMeta {
        op: d.op,
        log_pos: d.log_pos.clone(),
        log_time_ms: d.log_time_ms,
        commit_ts_ms: d.commit_ts_ms,
        extract_time_ms: d.extract_time_ms,
        topic: "t",
        partition: 0,
        offset: 0,
    });
    let _ = meta.finish();
}

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = decode_cdc(data) {
        append(&d);
    }
    if let Ok(d) = decode_json(data, Some(0)) {
        append(&d);
    }
});
