//! A serde `Deserializer` over the positioned tree, so the model stays plain derived structs.
//! Type mismatches are worded here, where both the node and the wanted type are known; the
//! error then leaves without a removal target, which the enclosing mapping or list adds.

use super::Session;
use super::access::{EnumAccess, MapAccess, SeqAccess};
use super::error::{DeError, describe_expected, one_of, whole_number};
use super::tree::{Kind, Node, Resolved};
use serde::de::{Expected, Visitor};

/// Deserializes one node; `path` is its field path, for messages.
#[derive(Debug)]
pub(crate) struct De<'a> {
    pub(crate) node: &'a Node,
    pub(crate) path: String,
    pub(crate) session: &'a Session,
}

macro_rules! unsigned {
    ($($method:ident => $visit:ident, $ty:ty;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let high = u64::from(<$ty>::MAX);
            let v = self.integer(&visitor, high)?;
            visitor.$visit(<$ty>::try_from(v).expect("checked against the type's range"))
        }
    )*};
}

macro_rules! signed {
    ($($method:ident => $visit:ident, $ty:ty;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            match self.resolved() {
                Some(Resolved::Int(v)) => match <$ty>::try_from(v) {
                    Ok(v) => visitor.$visit(v),
                    Err(_) => Err(self.out_of_range(v, <$ty>::MIN.into(), <$ty>::MAX.into())),
                },
                _ => Err(self.type_error("a number", "a whole number")),
            }
        }
    )*};
}

impl<'a> De<'a> {
    pub(crate) fn new(node: &'a Node, path: String, session: &'a Session) -> Self {
        De { node, path, session }
    }

    fn resolved(&self) -> Option<Resolved> {
        self.node.scalar().map(|s| s.resolve())
    }

    fn type_error(&self, noun: &str, expected: impl Into<String>) -> DeError {
        DeError::of_type(self.node, noun, expected).report_at(self.node, &self.path)
    }

    fn out_of_range(&self, v: i128, low: i128, high: i128) -> DeError {
        let expected = whole_number(low, high);
        DeError::new(format!("{v} is out of range"), Some(expected))
            .report_at(self.node, &self.path)
    }

    /// An unsigned integer within `low..=high`; `low` is 1 for serde's `NonZero*` visitors, so
    /// that a zero is worded like any other out-of-range number.
    fn integer<'de, V: Visitor<'de>>(&self, visitor: &V, high: u64) -> Result<u64, DeError> {
        let low = match (visitor as &dyn Expected).to_string().starts_with("a nonzero") {
            true => 1,
            false => 0,
        };
        match self.resolved() {
            Some(Resolved::Int(v)) if (low..=i128::from(high)).contains(&v) => {
                Ok(u64::try_from(v).expect("within the checked range"))
            }
            Some(Resolved::Int(v)) => Err(self.out_of_range(v, low, high.into())),
            _ => Err(self.type_error("a number", whole_number(low, high.into()))),
        }
    }
}

impl<'de> serde::Deserializer<'de> for De<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.kind {
            Kind::Scalar(s) => match s.resolve() {
                Resolved::Null => visitor.visit_unit(),
                Resolved::Bool(b) => visitor.visit_bool(b),
                Resolved::Int(i) => match u64::try_from(i) {
                    Ok(u) => visitor.visit_u64(u),
                    Err(_) => match i64::try_from(i) {
                        Ok(i) => visitor.visit_i64(i),
                        Err(_) => visitor.visit_str(&s.text),
                    },
                },
                Resolved::Float(f) => visitor.visit_f64(f),
                Resolved::Str => visitor.visit_str(&s.text),
            },
            Kind::Seq(items) => visitor.visit_seq(SeqAccess::new(items, &self.path, self.session)),
            Kind::Map(entries) => {
                visitor.visit_map(MapAccess::new(entries, None, &self.path, self.session))
            }
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.resolved() {
            Some(Resolved::Bool(b)) => visitor.visit_bool(b),
            _ => Err(self.type_error("a boolean", "true or false")),
        }
    }

    unsigned! {
        deserialize_u8 => visit_u8, u8;
        deserialize_u16 => visit_u16, u16;
        deserialize_u32 => visit_u32, u32;
        deserialize_u64 => visit_u64, u64;
    }

    signed! {
        deserialize_i8 => visit_i8, i8;
        deserialize_i16 => visit_i16, i16;
        deserialize_i32 => visit_i32, i32;
        deserialize_i64 => visit_i64, i64;
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.resolved() {
            Some(Resolved::Float(f)) => visitor.visit_f64(f),
            // Integers are numbers too: `ratio: 1` means 1.0.
            #[allow(clippy::cast_precision_loss)]
            Some(Resolved::Int(i)) => visitor.visit_f64(i as f64),
            _ => Err(self.type_error("a number", "a number, e.g. 0.5")),
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    /// Any non-empty scalar reads as a string, as written: `name: 123` is the name "123".
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.scalar() {
            Some(s) if !self.node.is_null() => visitor.visit_str(&s.text),
            _ => Err(self.type_error("a string", "a string")),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.is_null() {
            true => visitor.visit_none(),
            false => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.is_null() {
            true => visitor.visit_unit(),
            false => Err(self.type_error("empty", "nothing after the colon")),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    /// An empty value reads as an empty list, as it does for mappings below.
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.kind {
            Kind::Seq(items) => visitor.visit_seq(SeqAccess::new(items, &self.path, self.session)),
            _ if self.node.is_null() => {
                visitor.visit_seq(SeqAccess::new(&[], &self.path, self.session))
            }
            _ => Err(self.type_error("a list", "a list, e.g. [a, b]")),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let entries = match &self.node.kind {
            Kind::Map(entries) => entries.as_slice(),
            _ if self.node.is_null() => &[],
            _ => {
                let expected = describe_expected(&(&visitor as &dyn Expected).to_string());
                return Err(self.type_error("a mapping", expected));
            }
        };
        visitor.visit_map(MapAccess::new(entries, None, &self.path, self.session))
    }

    /// A mapping whose keys are checked against `fields`. `section:` with nothing after it
    /// means the section with its defaults.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let entries = match &self.node.kind {
            Kind::Map(entries) => entries.as_slice(),
            _ if self.node.is_null() => &[],
            // a section that may be switched off (`retry: off`) hands the word to its visitor
            Kind::Scalar(s) if name == crate::model::SECTION_OR_OFF => {
                return visitor.visit_str(&s.text);
            }
            _ => {
                let expected = format!("a mapping with keys: {}", fields.join(", "));
                return Err(self.type_error("a mapping", expected));
            }
        };
        let access = MapAccess::new(entries, Some(fields), &self.path, self.session);
        visitor.visit_map(access).map_err(|e| match e.missing {
            Some(_) => e.report_at(self.node, &self.path),
            None => e,
        })
    }

    /// `name` for a unit variant, or a mapping with exactly one key for a variant with data.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.kind {
            Kind::Map(entries) if entries.len() == 1 => {
                let access = EnumAccess::keyed(&entries[0], variants, &self.path, self.session);
                visitor.visit_enum(access)
            }
            Kind::Scalar(_) if !self.node.is_null() => {
                visitor.visit_enum(EnumAccess::named(self.node, variants, &self.path, self.session))
            }
            Kind::Map(_) => {
                let message = "needs exactly one key";
                Err(DeError::new(message, Some(one_of(variants))).report_at(self.node, &self.path))
            }
            _ => Err(self.type_error("valid here", one_of(variants))),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.scalar() {
            Some(s) => visitor.visit_str(&s.text),
            None => Err(self.type_error("a key", "a plain key such as listen")),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}
