//! Members exports: NDJSON, CSV, Parquet and Arrow IPC, encoded page by page so memory
//! stays bounded whatever the segment's size.
//!
//! Columns: `customer_id`, then the requested fields (`since`, `expires_at`, traits,
//! `profile.ATTR`). In Arrow and Parquet a trait's column type follows its rule type (bool,
//! number as float64, duration as int64 ms, string), `since` and `expires_at` are int64 ms;
//! profile attributes and lists are strings (a string value as is, anything else as JSON).
//! Ids come straight from the membership index, so an export without fields never reads
//! the store.

use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, Decimal128Builder, Float64Builder, Int64Builder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_buffer::{Buffer, OffsetBuffer};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use processor::index::IdPage;
use rules::{Type, Value};

use crate::access::mask::{mask_into, FieldPolicy, MaskParts};

/// The formats a members export can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ndjson,
    Csv,
    Parquet,
    Arrow,
}

impl Format {
    pub fn parse(name: &str) -> Option<Format> {
        Some(match name {
            "ndjson" => Format::Ndjson,
            "csv" => Format::Csv,
            "parquet" => Format::Parquet,
            "arrow" => Format::Arrow,
            _ => return None,
        })
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Parquet => "application/vnd.apache.parquet",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

/// A requested field: its column name and its rule type.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub ty: Type,
}

/// Turns pages of members into bytes of one format.
pub enum Encoder {
    Ndjson(Vec<Column>),
    Csv(Vec<Column>),
    Parquet(Box<parquet::arrow::ArrowWriter<Vec<u8>>>, SchemaRef, Vec<Column>),
    Arrow(
        Box<arrow_ipc::writer::StreamWriter<Vec<u8>>>,
        SchemaRef,
        Vec<Column>,
    ),
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
}

impl Encoder {
    pub fn new(format: Format, columns: Vec<Column>) -> Result<Encoder, EncodeError> {
        Ok(match format {
            Format::Ndjson => Encoder::Ndjson(columns),
            Format::Csv => Encoder::Csv(columns),
            Format::Parquet => {
                let schema = schema(&columns);
                // Ids are unique (masked ones nearly so): a dictionary for them would only be
                // built to be dropped once it overflows, so they are written plain.
                let properties = parquet::file::properties::WriterProperties::builder()
                    .set_column_dictionary_enabled(
                        parquet::schema::types::ColumnPath::from("customer_id"),
                        false,
                    )
                    .build();
                let writer =
                    parquet::arrow::ArrowWriter::try_new(Vec::new(), schema.clone(), Some(properties))?;
                Encoder::Parquet(Box::new(writer), schema, columns)
            }
            Format::Arrow => {
                let schema = schema(&columns);
                let writer = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &schema)?;
                Encoder::Arrow(Box::new(writer), schema, columns)
            }
        })
    }

    /// Bytes that go before the first page.
    pub fn header(&mut self) -> Vec<u8> {
        match self {
            Encoder::Csv(columns) => {
                let mut out = b"customer_id".to_vec();
                for c in columns.iter() {
                    out.push(b',');
                    csv_field(&mut out, &c.name);
                }
                out.push(b'\n');
                out
            }
            Encoder::Arrow(writer, ..) => std::mem::take(writer.get_mut()),
            Encoder::Ndjson(_) | Encoder::Parquet(..) => Vec::new(),
        }
    }

    /// Encodes one page: `ids` with, when fields were requested, `fields[i]` for `ids[i]`.
    /// What it returns can be sent right away.
    pub fn page(&mut self, ids: IdPage, fields: &[Vec<Option<Value>>]) -> Result<Vec<u8>, EncodeError> {
        self.page_with(ids, FieldPolicy::Show, fields)
    }

    /// [`Encoder::page`] with each customer id shown, masked or hidden as `id_policy` says,
    /// as it is written out (no page of masked ids between).
    pub fn page_with(
        &mut self,
        ids: IdPage,
        id_policy: FieldPolicy,
        fields: &[Vec<Option<Value>>],
    ) -> Result<Vec<u8>, EncodeError> {
        let row_fields = |i: usize| fields.get(i).map_or(&[][..], |f| &f[..]);
        let len = ids.len();
        let mut id = IdText {
            ids,
            policy: id_policy,
            scratch: String::new(),
        };
        match self {
            Encoder::Ndjson(columns) => {
                let mut out = Vec::with_capacity(len * 32);
                for i in 0..len {
                    out.extend_from_slice(b"{\"customer_id\":");
                    serde_json::to_writer(&mut out, id.get(i)).expect("writing to a Vec");
                    for (c, v) in columns.iter().zip(row_fields(i)) {
                        out.push(b',');
                        serde_json::to_writer(&mut out, &c.name).expect("writing to a Vec");
                        out.push(b':');
                        let v = v.as_ref().map_or(serde_json::Value::Null, Value::to_json);
                        serde_json::to_writer(&mut out, &v).expect("writing to a Vec");
                    }
                    out.extend_from_slice(b"}\n");
                }
                Ok(out)
            }
            Encoder::Csv(_) => {
                let mut out = Vec::with_capacity(len * 16);
                for i in 0..len {
                    csv_field(&mut out, id.get(i));
                    for v in row_fields(i) {
                        out.push(b',');
                        if let Some(v) = v {
                            csv_field(&mut out, &text(v));
                        }
                    }
                    out.push(b'\n');
                }
                Ok(out)
            }
            Encoder::Parquet(writer, schema, columns) => {
                if len == 0 {
                    return Ok(Vec::new());
                }
                writer.write(&record_batch(schema, columns, id.into_column(), fields)?)?;
                writer.flush()?;
                Ok(std::mem::take(writer.inner_mut()))
            }
            Encoder::Arrow(writer, schema, columns) => {
                if len == 0 {
                    return Ok(Vec::new());
                }
                writer.write(&record_batch(schema, columns, id.into_column(), fields)?)?;
                Ok(std::mem::take(writer.get_mut()))
            }
        }
    }

    /// Bytes that end the export (Parquet's footer, Arrow's end-of-stream marker).
    pub fn finish(self) -> Result<Vec<u8>, EncodeError> {
        match self {
            Encoder::Parquet(writer, ..) => Ok(writer.into_inner()?),
            Encoder::Arrow(mut writer, ..) => {
                writer.finish()?;
                Ok(std::mem::take(writer.get_mut()))
            }
            Encoder::Ndjson(_) | Encoder::Csv(_) => Ok(Vec::new()),
        }
    }
}

/// How number columns are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbers {
    /// `Decimal128(38, 9)` (exports): every decimal in range exactly, up to 9 digits after
    /// the point (more are rounded half to even: only quotients — `avg`, `/` — and inputs
    /// with 10+ fractional digits have them); 29 integer digits hold the whole range.
    Exact,
    /// `Float64` (SQL, where DataFusion computes).
    Float,
}

/// The scale of [`Numbers::Exact`] columns.
pub const DECIMAL_SCALE: i8 = 9;

pub fn arrow_type(ty: Type, numbers: Numbers) -> DataType {
    match (ty, numbers) {
        (Type::Bool, _) => DataType::Boolean,
        (Type::Num, Numbers::Exact) => DataType::Decimal128(38, DECIMAL_SCALE),
        (Type::Num, Numbers::Float) => DataType::Float64,
        (Type::Dur, _) => DataType::Int64,
        _ => DataType::Utf8,
    }
}

fn schema(columns: &[Column]) -> SchemaRef {
    let mut fields = vec![Field::new("customer_id", DataType::Utf8, false)];
    fields.extend(
        columns
            .iter()
            .map(|c| Field::new(&c.name, arrow_type(c.ty, Numbers::Exact), true)),
    );
    Arc::new(Schema::new(fields))
}

/// The ids of a page as they are written out: as stored, masked into one reused buffer, or
/// hidden.
struct IdText {
    ids: IdPage,
    policy: FieldPolicy,
    scratch: String,
}

impl IdText {
    fn get(&mut self, i: usize) -> &str {
        match self.policy {
            FieldPolicy::Show => self.ids.get(i),
            FieldPolicy::Mask => {
                self.scratch.clear();
                mask_into(self.ids.get(i), &mut self.scratch);
                &self.scratch
            }
            FieldPolicy::Hide => "***",
        }
    }

    /// The ids as an Arrow column made of the page's own text, without a copy: as stored,
    /// or masked in place (see [`mask_page_in_place`]).
    fn into_column(self) -> StringArray {
        let (text, ends) = self.ids.into_text();
        let (values, lengths) = match self.policy {
            FieldPolicy::Show => {
                let mut start = 0;
                let lengths = ends
                    .iter()
                    .map(|&end| end - std::mem::replace(&mut start, end))
                    .collect();
                (text.into_bytes(), lengths)
            }
            FieldPolicy::Hide => ("***".repeat(ends.len()).into_bytes(), vec![3; ends.len()]),
            FieldPolicy::Mask => {
                let mut values = text.into_bytes();
                let lengths = mask_page_in_place(&mut values, &ends);
                (values, lengths)
            }
        };
        let offsets = OffsetBuffer::<i32>::from_lengths(lengths);
        debug_assert!(std::str::from_utf8(&values)
            .is_ok_and(|text| offsets.iter().all(|&o| text.is_char_boundary(o as usize))));
        // SAFETY: `values` is UTF-8 and every offset falls on a character boundary: shown,
        // it is the page's own `String` and the offsets are the ends of whole ids; hidden,
        // it is `***` repeated; masked, each text is a run of its own whole leading
        // characters, ASCII stars and a run of its own whole trailing characters, written
        // one after the other (see `mask_page_in_place`; the tests compare every masked
        // page with `mask_text`). Arrow's own check would read the whole page again: a
        // tenth of a 10M-row export's CPU time.
        unsafe { StringArray::new_unchecked(offsets, Buffer::from_vec(values), None) }
    }
}

/// Masks each text of `values` (UTF-8, the texts ending at `ends`) as [`mask_into`] would,
/// in place, and returns the masked texts' lengths, one after the other from the start.
/// A masked text is never longer than the text (a masked character becomes one `*`), so
/// each is written at or before where it was read: its kept ends are moved (not at all
/// until a text has shrunk: ASCII texts keep their length) and its middle becomes stars.
fn mask_page_in_place(values: &mut Vec<u8>, ends: &[usize]) -> Vec<usize> {
    let mut lengths = Vec::with_capacity(ends.len());
    let (mut read, mut write) = (0, 0);
    for &end in ends {
        let parts = MaskParts::of(&values[read..end]);
        if read != write {
            values.copy_within(read..read + parts.head_end, write);
        }
        let stars_at = write + parts.head_end;
        values[stars_at..stars_at + parts.stars].fill(b'*');
        let tail_at = stars_at + parts.stars;
        if read + parts.tail_start != tail_at {
            values.copy_within(read + parts.tail_start..end, tail_at);
        }
        let masked = parts.masked_len(end - read);
        lengths.push(masked);
        write += masked;
        read = end;
    }
    values.truncate(write);
    lengths
}

fn record_batch(
    schema: &SchemaRef,
    columns: &[Column],
    ids: StringArray,
    rows: &[Vec<Option<Value>>],
) -> Result<RecordBatch, EncodeError> {
    let mut arrays: Vec<ArrayRef> = vec![Arc::new(ids)];
    for (i, c) in columns.iter().enumerate() {
        arrays.push(array_of(c.ty, Numbers::Exact, rows.iter().map(|r| r[i].as_ref())));
    }
    Ok(RecordBatch::try_new(schema.clone(), arrays)?)
}

/// One Arrow column of values of rule type `ty` (see [`arrow_type`]); values of another
/// type are null, except in string columns, which hold any value as text.
pub fn array_of<'v>(
    ty: Type,
    numbers: Numbers,
    values: impl ExactSizeIterator<Item = Option<&'v Value>>,
) -> ArrayRef {
    let n = values.len();
    match arrow_type(ty, numbers) {
        DataType::Decimal128(precision, scale) => {
            let b = Decimal128Builder::with_capacity(n);
            let mut b = b
                .with_precision_and_scale(precision, scale)
                .expect("a valid decimal type");
            values.for_each(|v| b.append_option(v.and_then(as_i128_at_scale)));
            Arc::new(b.finish())
        }
        DataType::Boolean => {
            let mut b = BooleanBuilder::with_capacity(n);
            values.for_each(|v| {
                b.append_option(v.and_then(|v| match v {
                    Value::Bool(b) => Some(*b),
                    _ => None,
                }))
            });
            Arc::new(b.finish())
        }
        DataType::Float64 => {
            let mut b = Float64Builder::with_capacity(n);
            values.for_each(|v| b.append_option(v.and_then(as_f64)));
            Arc::new(b.finish())
        }
        DataType::Int64 => {
            let mut b = Int64Builder::with_capacity(n);
            values.for_each(|v| {
                b.append_option(v.and_then(|v| match v {
                    Value::Dur(ms) => Some(*ms),
                    _ => None,
                }))
            });
            Arc::new(b.finish())
        }
        _ => {
            let mut b = StringBuilder::with_capacity(n, n * 8);
            values.for_each(|v| b.append_option(v.map(text)));
            Arc::new(b.finish())
        }
    }
}

/// A number as the integer of a [`DECIMAL_SCALE`] decimal (rounded half to even past it).
fn as_i128_at_scale(v: &Value) -> Option<i128> {
    let Value::Num(n) = v else { return None };
    let n = n.round_dp(DECIMAL_SCALE as u32);
    let up = 10i128.pow(DECIMAL_SCALE as u32 - n.scale());
    Some(n.mantissa() * up)
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Num(n) => rust_decimal::prelude::ToPrimitive::to_f64(n),
        _ => None,
    }
}

/// A value as text: strings as they are, anything else as its JSON.
fn text(v: &Value) -> String {
    match v {
        Value::Str(s) => s.to_string(),
        other => other.to_json().to_string(),
    }
}

/// Appends a CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(out: &mut Vec<u8>, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push(b'"');
        out.extend_from_slice(s.replace('"', "\"\"").as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(s.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::mask::mask_text;

    /// The `customer_id` column of an Arrow export of one page of `ids`.
    fn arrow_ids(ids: &[&str], policy: FieldPolicy) -> Vec<String> {
        let page = IdPage::from_ids(ids.iter().enumerate().map(|(i, id)| (i as u32, *id)));
        let mut encoder = Encoder::new(Format::Arrow, Vec::new()).unwrap();
        let mut bytes = encoder.header();
        bytes.extend(encoder.page_with(page, policy, &[]).unwrap());
        bytes.extend(encoder.finish().unwrap());
        let reader = arrow_ipc::reader::StreamReader::try_new(&bytes[..], None).unwrap();
        let mut out = Vec::new();
        for batch in reader {
            let batch = batch.unwrap();
            let column = batch.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            out.extend(column.iter().map(|v| v.unwrap().to_owned()));
        }
        out
    }

    #[test]
    fn id_columns_are_shown_masked_or_hidden_whatever_the_text() {
        let ascii = ["13800000001", "abc", "ab", "", "c-1234567"];
        let mixed = [
            "13800000001",
            "张三丰有限公司",
            "ab",
            "",
            "ｃ１２３４５６７８",
            "张三",
            "张三丰",
            "a张b",
        ];
        let ends = [
            "13800000001",
            "上海闵行区某某贸易有限公司",
            "x",
            "上海闵行区某某贸易有限公司",
        ];
        for ids in [&ascii[..], &mixed[..], &ends[..]] {
            assert_eq!(arrow_ids(ids, FieldPolicy::Show), ids);
            let masked: Vec<String> = ids.iter().map(|id| mask_text(id)).collect();
            assert_eq!(arrow_ids(ids, FieldPolicy::Mask), masked);
            assert_eq!(arrow_ids(ids, FieldPolicy::Hide), vec!["***"; ids.len()]);
        }
        assert_eq!(arrow_ids(&ascii, FieldPolicy::Mask)[..2], ["138****0001", "a*c"]);
    }

    proptest::proptest! {
        /// Pages of ids of any length mixing 1- to 4-byte characters, in any order: each
        /// masked in place reads as `mask_text` of it, shrunk ids or not before it.
        #[test]
        fn any_page_masks_in_place_as_id_by_id(
            ids in proptest::collection::vec("[0-9a-z\u{e9}\u{5f20}\u{1f600}#]{0,20}", 0..40)
        ) {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let masked: Vec<String> = ids.iter().map(|id| mask_text(id)).collect();
            proptest::prop_assert_eq!(arrow_ids(&ids, FieldPolicy::Mask), masked);
        }
    }
}
