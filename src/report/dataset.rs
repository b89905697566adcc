//! Building blocks of the data sets: elements, coded concepts and SR content items
//! (PS3.3 C.17.3, Document Content Module), as dicom-object values.

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

/// A data set or sequence item.
pub type Item = InMemDicomObject;

/// A coded concept (Code Value, Coding Scheme Designator, Code Meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    pub value: &'static str,
    pub scheme: &'static str,
    pub meaning: &'static str,
}

pub const fn code(value: &'static str, scheme: &'static str, meaning: &'static str) -> Code {
    Code {
        value,
        scheme,
        meaning,
    }
}

/// Our own concepts, in a private coding scheme (PS3.16 8.2: designators starting "99").
pub const PRIVATE_SCHEME: &str = "99CSPINE";

/// Puts a text value (`""`: present, empty; for type 2 attributes).
pub fn put_str(obj: &mut Item, tag: Tag, vr: VR, value: &str) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
}

/// Puts a sequence of `items` (none: an empty sequence, for type 2 attributes).
pub fn put_seq(obj: &mut Item, tag: Tag, items: Vec<Item>) {
    obj.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
}

/// An item of a code sequence.
pub fn code_item(c: Code) -> Item {
    let mut item = Item::new_empty();
    put_str(&mut item, tags::CODE_VALUE, VR::SH, c.value);
    put_str(&mut item, tags::CODING_SCHEME_DESIGNATOR, VR::SH, c.scheme);
    put_str(&mut item, tags::CODE_MEANING, VR::LO, c.meaning);
    item
}

/// Relationship of a content item to its parent (PS3.3 C.17.3.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rel {
    Contains,
    HasObsContext,
    HasConceptMod,
}

impl Rel {
    fn as_str(self) -> &'static str {
        match self {
            Rel::Contains => "CONTAINS",
            Rel::HasObsContext => "HAS OBS CONTEXT",
            Rel::HasConceptMod => "HAS CONCEPT MOD",
        }
    }
}

/// A content item's start: relationship, value type and (optional) concept name.
fn item(rel: Rel, value_type: &str, name: Option<Code>) -> Item {
    let mut item = Item::new_empty();
    put_str(&mut item, tags::RELATIONSHIP_TYPE, VR::CS, rel.as_str());
    put_str(&mut item, tags::VALUE_TYPE, VR::CS, value_type);
    if let Some(name) = name {
        put_seq(
            &mut item,
            tags::CONCEPT_NAME_CODE_SEQUENCE,
            vec![code_item(name)],
        );
    }
    item
}

/// A CONTAINER content item with `children` (SEPARATE continuity).
pub fn container(rel: Rel, name: Code, children: Vec<Item>) -> Item {
    let mut c = item(rel, "CONTAINER", Some(name));
    put_str(&mut c, tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE");
    if !children.is_empty() {
        put_seq(&mut c, tags::CONTENT_SEQUENCE, children);
    }
    c
}

/// A TEXT content item.
pub fn text(rel: Rel, name: Code, value: &str) -> Item {
    let mut t = item(rel, "TEXT", Some(name));
    put_str(&mut t, tags::TEXT_VALUE, VR::UT, value);
    t
}

/// A CODE content item.
pub fn coded(rel: Rel, name: Code, value: Code) -> Item {
    let mut c = item(rel, "CODE", Some(name));
    put_seq(&mut c, tags::CONCEPT_CODE_SEQUENCE, vec![code_item(value)]);
    c
}

/// A NUM content item: `value` in `units`.
pub fn num(rel: Rel, name: Code, value: f64, units: Code) -> Item {
    let mut n = item(rel, "NUM", Some(name));
    let mut measured = Item::new_empty();
    put_str(&mut measured, tags::NUMERIC_VALUE, VR::DS, &ds(value));
    put_seq(
        &mut measured,
        tags::MEASUREMENT_UNITS_CODE_SEQUENCE,
        vec![code_item(units)],
    );
    put_seq(&mut n, tags::MEASURED_VALUE_SEQUENCE, vec![measured]);
    n
}

/// A UIDREF content item.
pub fn uidref(rel: Rel, name: Code, uid: &str) -> Item {
    let mut u = item(rel, "UIDREF", Some(name));
    put_str(&mut u, tags::UID, VR::UI, uid);
    u
}

/// An IMAGE content item referencing one instance (`name` None: no concept name, as
/// Key Object Selection documents list their images).
pub fn image(rel: Rel, name: Option<Code>, sop_class_uid: &str, sop_instance_uid: &str) -> Item {
    let mut i = item(rel, "IMAGE", name);
    put_seq(
        &mut i,
        tags::REFERENCED_SOP_SEQUENCE,
        vec![sop_ref(sop_class_uid, sop_instance_uid)],
    );
    i
}

/// An item naming one instance (Referenced SOP Class and Instance UIDs).
pub fn sop_ref(sop_class_uid: &str, sop_instance_uid: &str) -> Item {
    let mut r = Item::new_empty();
    put_str(
        &mut r,
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        sop_class_uid,
    );
    put_str(
        &mut r,
        tags::REFERENCED_SOP_INSTANCE_UID,
        VR::UI,
        sop_instance_uid,
    );
    r
}

/// The root content item of a document, written into the data set itself: a CONTAINER
/// titled `title`, following template `template` of DCMR, holding `children`.
pub fn put_root(obj: &mut Item, title: Code, template: &str, children: Vec<Item>) {
    put_str(obj, tags::VALUE_TYPE, VR::CS, "CONTAINER");
    put_seq(
        obj,
        tags::CONCEPT_NAME_CODE_SEQUENCE,
        vec![code_item(title)],
    );
    put_str(obj, tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE");
    let mut tid = Item::new_empty();
    put_str(&mut tid, tags::MAPPING_RESOURCE, VR::CS, "DCMR");
    put_str(&mut tid, tags::TEMPLATE_IDENTIFIER, VR::CS, template);
    put_seq(obj, tags::CONTENT_TEMPLATE_SEQUENCE, vec![tid]);
    put_seq(obj, tags::CONTENT_SEQUENCE, children);
}

/// A DS (decimal string) value: at most 16 characters, no needless trailing zeros.
pub fn ds(v: f64) -> String {
    for prec in (0..=6).rev() {
        let s = format!("{v:.prec$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        let s = if s == "-0" { "0".to_string() } else { s };
        if s.len() <= 16 {
            return s;
        }
    }
    format!("{v:.0}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_are_short() {
        assert_eq!(ds(0.87), "0.87");
        assert_eq!(ds(0.5), "0.5");
        assert_eq!(ds(1.0), "1");
        assert_eq!(ds(0.123456789), "0.123457");
        assert!(ds(1e14 + 0.5).len() <= 16);
    }
}
