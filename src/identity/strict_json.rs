//! JSON parsing that refuses duplicate object members at any depth.
//!
//! serde_json keeps the last of two equal keys; a JWT verifier that does so can be told
//! one `sub` by a token while another component reads the first one (RFC 8725 §3.10,
//! RFC 7515 §5.2). A token with a duplicate member is therefore rejected outright.

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Why a JSON text was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrictJsonError {
    /// The same member name appears twice in one object.
    Duplicate(String),
    /// Not valid JSON (or not representable).
    Malformed(String),
}

const DUP: &str = "duplicate member:";

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("{DUP}{key}")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parses `bytes` as one JSON value, refusing duplicate object members.
pub fn parse(bytes: &[u8]) -> Result<Value, StrictJsonError> {
    serde_json::from_slice::<Strict>(bytes)
        .map(|s| s.0)
        .map_err(|e| {
            let msg = e.to_string();
            match msg.strip_prefix(DUP) {
                // serde_json appends " at line L column C"; the name is what precedes it.
                Some(rest) => StrictJsonError::Duplicate(
                    rest.rsplit_once(" at line ")
                        .map_or(rest, |(name, _)| name)
                        .to_string(),
                ),
                None => StrictJsonError::Malformed(msg),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_top_level_member_is_named() {
        assert_eq!(
            parse(br#"{"sub":"a","sub":"b"}"#),
            Err(StrictJsonError::Duplicate("sub".into()))
        );
    }

    #[test]
    fn a_duplicate_nested_member_is_refused() {
        assert_eq!(
            parse(br#"{"k":{"x":1,"x":2}}"#),
            Err(StrictJsonError::Duplicate("x".into()))
        );
    }

    #[test]
    fn distinct_members_parse() {
        let v = parse(br#"{"a":1,"b":[true,null,"s",1.5],"c":{"d":-2}}"#).expect("valid");
        assert_eq!(v["c"]["d"], -2);
    }

    #[test]
    fn trailing_garbage_is_malformed() {
        assert!(matches!(
            parse(br#"{"a":1} x"#),
            Err(StrictJsonError::Malformed(_))
        ));
    }
}
