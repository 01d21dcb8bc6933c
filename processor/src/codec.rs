//! A small, versioned binary encoding for what the engine stores: varints, strings, rule
//! values and event properties. Compact and allocation-light on the hot path, unlike JSON.

use std::sync::Arc;

use rules::{Props, Value};
use rust_decimal::Decimal;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("corrupt stored record: {0}")]
pub struct CodecError(pub &'static str);

/// Appends encoded fields to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer {
            buf: Vec::with_capacity(64),
        }
    }

    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub fn u64(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    pub fn i64(&mut self, v: i64) {
        self.u64(((v << 1) ^ (v >> 63)) as u64);
    }

    pub fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.i64(v);
            }
        }
    }

    pub fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    pub fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.u8(0),
            Value::Bool(false) => self.u8(1),
            Value::Bool(true) => self.u8(2),
            Value::Num(n) => match i64::try_from(n.mantissa()) {
                // Most numbers (money, counts) fit a 64-bit mantissa: 2-10 bytes instead of 16.
                Ok(m) if !(m == 0 && n.is_sign_negative()) => {
                    self.u8(7);
                    self.u8(n.scale() as u8);
                    self.i64(m);
                }
                _ => {
                    self.u8(3);
                    self.buf.extend_from_slice(&n.serialize());
                }
            },
            Value::Str(s) => {
                self.u8(4);
                self.str(s);
            }
            Value::Dur(ms) => {
                self.u8(5);
                self.i64(*ms);
            }
            Value::List(items) => {
                self.u8(6);
                self.u64(items.len() as u64);
                for item in items.iter() {
                    self.value(item);
                }
            }
        }
    }

    pub fn props(&mut self, props: &Props) {
        self.u64(props.len() as u64);
        for (k, v) in props.iter() {
            self.str(k);
            self.value(v);
        }
    }
}

/// Reads fields written by [`Writer`].
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        let b = *self.buf.get(self.pos).ok_or(CodecError("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    pub fn u64(&mut self) -> Result<u64, CodecError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(CodecError("varint too long"))
    }

    pub fn i64(&mut self) -> Result<i64, CodecError> {
        let v = self.u64()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    pub fn opt_i64(&mut self) -> Result<Option<i64>, CodecError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.i64()?)),
            _ => Err(CodecError("bad option tag")),
        }
    }

    pub fn len(&mut self) -> Result<usize, CodecError> {
        let n = self.u64()? as usize;
        if n > self.buf.len() - self.pos.min(self.buf.len()) {
            return Err(CodecError("length past the end"));
        }
        Ok(n)
    }

    /// The next `n` raw bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or(CodecError("truncated"))?;
        let b = &self.buf[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.len()?;
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    pub fn str(&mut self) -> Result<&'a str, CodecError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| CodecError("invalid UTF-8"))
    }

    pub fn arc_str(&mut self) -> Result<Arc<str>, CodecError> {
        self.str().map(Arc::from)
    }

    pub fn value(&mut self) -> Result<Value, CodecError> {
        Ok(match self.u8()? {
            0 => Value::Null,
            1 => Value::Bool(false),
            2 => Value::Bool(true),
            3 => {
                let end = self.pos + 16;
                let raw: [u8; 16] = self
                    .buf
                    .get(self.pos..end)
                    .ok_or(CodecError("truncated decimal"))?
                    .try_into()
                    .expect("16 bytes");
                self.pos = end;
                Value::Num(Decimal::deserialize(raw))
            }
            4 => Value::Str(self.arc_str()?),
            5 => Value::Dur(self.i64()?),
            6 => {
                let n = self.len()?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value()?);
                }
                Value::List(items.into())
            }
            7 => {
                let scale = u32::from(self.u8()?);
                let mantissa = self.i64()?;
                Value::Num(
                    Decimal::try_from_i128_with_scale(i128::from(mantissa), scale)
                        .map_err(|_| CodecError("bad decimal scale"))?,
                )
            }
            _ => return Err(CodecError("bad value tag")),
        })
    }

    pub fn props(&mut self) -> Result<Props, CodecError> {
        let n = self.len()?;
        let mut pairs = Vec::with_capacity(n);
        for _ in 0..n {
            let k: Box<str> = self.str()?.into();
            pairs.push((k, self.value()?));
        }
        Ok(Props::new(pairs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let values = vec![
            Value::Null,
            Value::Bool(true),
            Value::Num("-1234.567890".parse().unwrap()),
            Value::Num("0.30".parse().unwrap()),
            Value::Num("-0.0".parse().unwrap()),
            Value::Num(Decimal::MAX),
            Value::Num("12345678901234567890123.45678".parse().unwrap()),
            Value::str("杭州\u{200b}"),
            Value::Dur(-5),
            Value::List(vec![Value::num(1), Value::str("a")].into()),
        ];
        let mut w = Writer::new();
        for v in &values {
            w.value(v);
        }
        w.i64(i64::MIN);
        w.opt_i64(Some(7));
        let mut r = Reader::new(&w.buf);
        for v in &values {
            let back = r.value().unwrap();
            assert_eq!(&back, v);
            // Exactly, scale and sign included: 0.30 prints as it came.
            if let (Value::Num(a), Value::Num(b)) = (&back, v) {
                assert_eq!(
                    (a.to_string(), a.is_sign_negative()),
                    (b.to_string(), b.is_sign_negative())
                );
            }
        }
        assert_eq!(r.i64().unwrap(), i64::MIN);
        assert_eq!(r.opt_i64().unwrap(), Some(7));
        assert!(r.is_empty());
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut w = Writer::new();
        w.value(&Value::str("hello"));
        for cut in 0..w.buf.len() {
            assert!(Reader::new(&w.buf[..cut]).value().is_err());
        }
    }
}
