//! Feed arbitrary bytes to the CSV record reader of `qanat sync`'s file source: it must never
//! panic, and every record it accepts must survive the canonical text → Arrow conversion (as
//! a table of text columns) without panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qanat_sync::files::CsvRecords;
use qanat_sync::types::{BatchBuilder, CanonicalType, Column, TableSchema};

fuzz_target!(|data: &[u8]| {
    let mut records = CsvRecords::new(data);
    while let Ok(true) = records.next_record() {
        let schema = TableSchema {
            columns: (0..records.fields.len())
                .map(|i| Column {
                    name: format!("c{i}"),
                    ty: if i % 2 == 0 { CanonicalType::Utf8 } else { CanonicalType::Int64 },
                    nullable: true,
                    native: "text".into(),
                })
                .collect(),
            primary_key: Vec::new(),
        };
        let cells: Vec<Option<&[u8]>> = records.fields.iter().map(|f| f.as_deref()).collect();
        let mut builder = BatchBuilder::new(&schema);
        let _ = builder.push_text_row(&cells);
        let _ = builder.finish();
    }
});
