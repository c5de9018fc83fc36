//! serde's views of a mapping, a list and an enum over the tree.
//! The mapping skips unknown keys itself, noting each at its key, so one typo does not hide the
//! rest of the file; a failing value gets its node as the removal target for the next attempt.

use super::de::De;
use super::error::{DeError, one_of};
use super::tree::{Entry, Node};
use super::{Session, index_path, key_path};
use serde::de::{DeserializeSeed, Visitor};
use std::iter::Enumerate;
use std::slice::Iter;

/// A mapping's entries; with `fields`, keys outside that list are noted and skipped.
#[derive(Debug)]
pub(crate) struct MapAccess<'a> {
    entries: Iter<'a, Entry>,
    fields: Option<&'static [&'static str]>,
    path: &'a str,
    session: &'a Session,
    current: Option<(&'a Entry, String)>,
}

/// A list's items, reported under their index as written, even after earlier items were removed.
#[derive(Debug)]
pub(crate) struct SeqAccess<'a> {
    items: Enumerate<Iter<'a, Node>>,
    path: &'a str,
    session: &'a Session,
}

/// An enum: a plain name (`random`) or a mapping with one key naming the variant.
#[derive(Debug)]
pub(crate) struct EnumAccess<'a> {
    name: &'a Node,
    value: Option<&'a Node>,
    variants: &'static [&'static str],
    path: &'a str,
    session: &'a Session,
}

fn key_text(node: &Node) -> &str {
    node.scalar().map_or("?", |s| s.text.as_str())
}

// === impl MapAccess ===

impl<'a> MapAccess<'a> {
    pub(crate) fn new(
        entries: &'a [Entry],
        fields: Option<&'static [&'static str]>,
        path: &'a str,
        session: &'a Session,
    ) -> Self {
        MapAccess { entries: entries.iter(), fields, path, session, current: None }
    }
}

impl<'de> serde::de::MapAccess<'de> for MapAccess<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        for entry in self.entries.by_ref() {
            if self.session.is_removed(entry.value.id) {
                continue;
            }
            let key = key_text(&entry.key);
            let path = key_path(self.path, key);
            if let Some(fields) = self.fields
                && !fields.contains(&key)
            {
                let unknown = DeError::new("unknown field", Some(one_of(fields)));
                self.session.note(unknown.report_at(&entry.key, &path));
                continue;
            }
            let key = seed
                .deserialize(De::new(&entry.key, path.clone(), self.session))
                .map_err(|e| e.report_at(&entry.key, &path).remove(&entry.value, &path))?;
            self.current = Some((entry, path));
            return Ok(Some(key));
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let (entry, path) = self.current.take().expect("serde asks for a value after its key");
        seed.deserialize(De::new(&entry.value, path.clone(), self.session))
            .map_err(|e| e.remove(&entry.value, &path))
    }
}

// === impl SeqAccess ===

impl<'a> SeqAccess<'a> {
    pub(crate) fn new(items: &'a [Node], path: &'a str, session: &'a Session) -> Self {
        SeqAccess { items: items.iter().enumerate(), path, session }
    }
}

impl<'de> serde::de::SeqAccess<'de> for SeqAccess<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        for (i, item) in self.items.by_ref() {
            if self.session.is_removed(item.id) {
                continue;
            }
            let path = index_path(self.path, i);
            return seed
                .deserialize(De::new(item, path.clone(), self.session))
                .map(Some)
                .map_err(|e| e.remove(item, &path));
        }
        Ok(None)
    }
}

// === impl EnumAccess ===

impl<'a> EnumAccess<'a> {
    pub(crate) fn keyed(
        entry: &'a Entry,
        variants: &'static [&'static str],
        path: &'a str,
        session: &'a Session,
    ) -> Self {
        EnumAccess { name: &entry.key, value: Some(&entry.value), variants, path, session }
    }

    pub(crate) fn named(
        node: &'a Node,
        variants: &'static [&'static str],
        path: &'a str,
        session: &'a Session,
    ) -> Self {
        EnumAccess { name: node, value: None, variants, path, session }
    }

    /// The variant's data, reported under `enum_path.variant`.
    fn value(&self) -> Result<(&'a Node, String), DeError> {
        let variant = key_text(self.name);
        match self.value {
            Some(value) => Ok((value, key_path(self.path, variant))),
            None => {
                let expected = format!("settings, e.g. {{ {variant}: ... }}");
                let message = format!("{variant} alone is not enough");
                Err(DeError::new(message, Some(expected)).report_at(self.name, self.path))
            }
        }
    }
}

impl<'de> serde::de::EnumAccess<'de> for EnumAccess<'_> {
    type Error = DeError;
    type Variant = Self;

    /// An unknown name fails the whole enum (there is no value to go on with), worded like an
    /// unknown field when it is a key.
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), DeError> {
        let name = key_text(self.name);
        if !self.variants.contains(&name) {
            let expected = Some(one_of(self.variants));
            return Err(match self.value {
                Some(_) => DeError::new("unknown field", expected)
                    .report_at(self.name, &key_path(self.path, name)),
                None => DeError::new(format!("unknown value {name:?}"), expected)
                    .report_at(self.name, self.path),
            });
        }
        let variant = seed.deserialize(De::new(self.name, self.path.to_owned(), self.session))?;
        Ok((variant, self))
    }
}

impl<'de> serde::de::VariantAccess<'de> for EnumAccess<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        match self.value {
            Some(value) if !value.is_null() => {
                let message = format!("{} takes no settings", key_text(self.name));
                let expected = Some(format!("just the name: {}", key_text(self.name)));
                Err(DeError::new(message, expected).report_at(value, self.path))
            }
            _ => Ok(()),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        let (value, path) = self.value()?;
        seed.deserialize(De::new(value, path.clone(), self.session))
            .map_err(|e| e.report_at(value, &path))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        let (value, path) = self.value()?;
        serde::Deserializer::deserialize_seq(De::new(value, path, self.session), visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let (value, path) = self.value()?;
        serde::Deserializer::deserialize_struct(
            De::new(value, path, self.session),
            "",
            fields,
            visitor,
        )
    }
}
