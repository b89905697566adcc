//! Declared lengths against the bytes actually received, checked before dicom-object
//! parses a data set.
//!
//! Why: dicom-parser 0.10 allocates and zero-fills a value's *declared* length before it
//! reads the value (`read_value_ob` grows a `SmallVec` byte by byte). A peer that declares
//! 0x7FFFFFFE bytes and sends a few keeps a worker at 100 % CPU (about 4 s per 2 GB on an
//! idle machine, minutes on a loaded one) and its memory at 2 GiB, per instance: the
//! "parse-back hang" found by tests/reliability/fuzz_network.py. A `Take` or any other
//! limited reader does not help: the allocation happens before the first read, and
//! dicom-parser has no setting that caps a length.
//!
//! What dicom-parser does offer is the seam between its `DataSetReader` (the state
//! machine of elements, sequences, items, delimiters and encapsulated pixel data that
//! dicom-object's parse is built on) and the decoder it drives (`StatefulDecode`).
//! [`check_file`] runs that same `DataSetReader`, with the options dicom-object uses,
//! over [`Bounded`], a decoder that refuses every element, sequence or item whose defined
//! length runs past the end of the data, before anything is allocated. No second DICOM
//! parser to keep in step: headers, VRs (explicit, or from the dictionary for implicit
//! VR), undefined lengths and fragments are read by the code that will read them later.
//! Large values are skipped, not read, so the check needs constant memory whatever the
//! size of the data set, and it covers the pixel data that the parse-back of large
//! instances does not read. Deflated data sets are inflated twice (once to learn their
//! length, capped by [`MAX_INFLATED_LEN`], once to check them).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use dicom_core::header::{DataElementHeader, HasLength, Length, SequenceItemHeader};
use dicom_core::value::PrimitiveValue;
use dicom_encoding::text::SpecificCharacterSet;
use dicom_encoding::transfer_syntax::TransferSyntax;
use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_parser::dataset::read::{DataSetReader, DataSetReaderOptions};
use dicom_parser::dataset::DataToken;
use dicom_parser::stateful::decode::{
    CharacterSetOverride, DynStatefulDecoder, Error as DecodeError, Result as DecodeResult,
    StatefulDecode,
};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// A deflated data set may inflate to at most this many bytes (a 700-frame 512x512
/// Enhanced CT is about 370 MB). Bounds the time a small deflate bomb can cost.
pub const MAX_INFLATED_LEN: u64 = 1 << 30;
/// Sequences may nest this deep. dicom-object builds nested sequences recursively: 3000
/// levels of undefined-length sequence and item (20 bytes each, 60 KB in all) overflow
/// a 2 MiB worker stack and abort the whole daemon (measured with dicom-object 0.10.1).
/// Real CT/MR data sets nest fewer than ten.
pub const MAX_SEQUENCE_DEPTH: usize = 32;
/// Values up to this size are read as dicom-object reads them (the decoder remembers
/// Specific Character Set and Pixel Representation); longer ones are skipped.
const READ_VALUES_UP_TO: u32 = 64 * 1024;

/// Checks the data set stored in `path` from byte `offset` to the end of the file,
/// encoded in transfer syntax `ts_uid`. Returns its length in bytes (after inflating, for
/// the deflated syntax), or why it must be refused: which element, at which offset of
/// the data set, declares more bytes than follow it.
pub fn check_file(path: &Path, offset: u64, ts_uid: &str) -> Result<u64> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .len()
        .saturating_sub(offset);
    check_source(
        || {
            let mut f =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            f.seek(SeekFrom::Start(offset))?;
            Ok(Box::new(BufReader::with_capacity(64 * 1024, f)))
        },
        len,
        ts_uid,
    )
}

/// [`check_file`] of a data set held in memory (a received instance that was never
/// written out).
pub fn check_slice(data_set: &[u8], ts_uid: &str) -> Result<u64> {
    check_source(|| Ok(Box::new(data_set)), data_set.len() as u64, ts_uid)
}

/// What [`check_file`] and [`check_slice`] share: `open` gives the encoded data set of
/// `len` bytes from its start, as often as it is called.
fn check_source<'r>(
    open: impl Fn() -> Result<Box<dyn Read + 'r>>,
    len: u64,
    ts_uid: &str,
) -> Result<u64> {
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| anyhow!("unknown transfer syntax {ts_uid}"))?;
    match ts.codec() {
        Codec::Dataset(Some(adapter)) => {
            // Deflated: the same adapter dicom-object uses, once to measure, once to check.
            let mut inflated = adapter.adapt_reader(open()?);
            let len = io::copy(
                &mut (&mut inflated).take(MAX_INFLATED_LEN + 1),
                &mut io::sink(),
            )
            .context("the deflated data set cannot be inflated")?;
            if len > MAX_INFLATED_LEN {
                bail!(
                    "the deflated data set inflates to more than {} MiB",
                    MAX_INFLATED_LEN >> 20
                );
            }
            check_stream(adapter.adapt_reader(open()?), ts, len)?;
            Ok(len)
        }
        Codec::Dataset(None) => bail!("no decoder for transfer syntax {ts_uid}"),
        Codec::None | Codec::EncapsulatedPixelData(..) => {
            check_stream(open()?, ts, len)?;
            Ok(len)
        }
    }
}

/// Checks a data set held in memory (a DIMSE command set, tests).
pub fn check_bytes(bytes: &[u8], ts: &TransferSyntax) -> Result<()> {
    check_stream(bytes, ts, bytes.len() as u64)
}

/// Walks the `len` bytes of `src` with dicom-parser's `DataSetReader` over [`Bounded`].
fn check_stream<R: Read>(src: R, ts: &TransferSyntax, len: u64) -> Result<()> {
    // Exactly what dicom-object's `open_file` / `read_dataset_with_ts` build, except
    // for the decoder wrapper: same decoder for the syntax, default options, position 0.
    let inner = DynStatefulDecoder::new_with_override(
        src,
        ts,
        SpecificCharacterSet::default(),
        CharacterSetOverride::None,
        0,
    )
    .map_err(|e| anyhow!("{e}"))?;
    let mut bounded = Bounded {
        inner,
        end: len,
        violation: None,
    };
    let mut depth = 0usize;
    let mut reader = DataSetReader::new(&mut bounded, DataSetReaderOptions::default());
    let mut failure = None;
    for token in &mut reader {
        match token {
            Ok(DataToken::SequenceStart { .. } | DataToken::PixelSequenceStart) => {
                depth += 1;
                if depth > MAX_SEQUENCE_DEPTH {
                    failure = Some(anyhow!(
                        "sequences nested more than {MAX_SEQUENCE_DEPTH} deep"
                    ));
                    break;
                }
            }
            Ok(DataToken::SequenceEnd) => depth = depth.saturating_sub(1),
            Ok(_) => {}
            Err(e) => {
                failure = Some(anyhow!("{}", error_chain(&e)));
                break;
            }
        }
    }
    drop(reader);
    // The length violation, when there is one, is the precise reason; the parser's own
    // error only says that a read failed.
    match (bounded.violation, failure) {
        (Some(v), _) => Err(anyhow!(v)),
        (None, Some(e)) => Err(e),
        (None, None) => Ok(()),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// A `StatefulDecode` that refuses, before anything is allocated, every element header,
/// item header or value read whose defined length runs past `end` (the data set's
/// length), and skips long values instead of reading them.
struct Bounded<S> {
    inner: S,
    end: u64,
    /// The first refusal, in words (tag, VR, offset in the data set, lengths).
    violation: Option<String>,
}

impl<S: StatefulDecode> Bounded<S> {
    /// `Err` when `len` (a defined length) does not fit in what follows `self.position()`.
    /// `what` and `at` describe the element for the log.
    fn fits(&mut self, len: Length, what: impl FnOnce() -> String, at: u64) -> DecodeResult<()> {
        let Some(n) = len.get() else {
            return Ok(()); // undefined: delimiters end it, the reader checks those
        };
        let remaining = self.end.saturating_sub(self.inner.position());
        if u64::from(n) <= remaining {
            return Ok(());
        }
        self.violation.get_or_insert_with(|| {
            format!(
                "{} at offset {at} of the data set declares {n} bytes, but only {remaining} follow",
                what()
            )
        });
        // Any error stops the reader; the reason above is what gets reported.
        Err(DecodeError::AllocateValueData { len: n })
    }

    /// A value of `header` is next: refuse it if too long, skip it if long.
    fn value(
        &mut self,
        header: &DataElementHeader,
        read: impl FnOnce(&mut S) -> DecodeResult<PrimitiveValue>,
    ) -> DecodeResult<PrimitiveValue> {
        let at = self.inner.position();
        self.fits(header.length(), || describe(header), at)?;
        match header.length().get() {
            Some(n) if n > READ_VALUES_UP_TO => {
                self.inner.skip_bytes(n)?;
                Ok(PrimitiveValue::Empty)
            }
            _ => read(&mut self.inner),
        }
    }

    /// Raw bytes (an item value: a pixel data fragment or the offset table) are next.
    fn raw(&mut self, length: u32) -> DecodeResult<()> {
        let at = self.inner.position();
        self.fits(Length(length), || "item value".to_string(), at)?;
        self.inner.skip_bytes(length)
    }
}

fn describe(header: &DataElementHeader) -> String {
    format!("element {} {}", header.tag, header.vr)
}

impl<S: StatefulDecode> StatefulDecode for Bounded<S> {
    type Reader = S::Reader;

    fn decode_header(&mut self) -> DecodeResult<DataElementHeader> {
        let at = self.inner.position();
        let header = self.inner.decode_header()?;
        // Sequences of defined length too: their end must be in the data.
        self.fits(header.length(), || describe(&header), at)?;
        Ok(header)
    }

    fn decode_item_header(&mut self) -> DecodeResult<SequenceItemHeader> {
        let at = self.inner.position();
        let header = self.inner.decode_item_header()?;
        if let SequenceItemHeader::Item { len } = header {
            self.fits(len, || "item (FFFE,E000)".to_string(), at)?;
        }
        Ok(header)
    }

    fn read_value(&mut self, header: &DataElementHeader) -> DecodeResult<PrimitiveValue> {
        self.value(header, |d| d.read_value(header))
    }

    fn read_value_preserved(&mut self, header: &DataElementHeader) -> DecodeResult<PrimitiveValue> {
        self.value(header, |d| d.read_value_preserved(header))
    }

    fn read_value_bytes(&mut self, header: &DataElementHeader) -> DecodeResult<PrimitiveValue> {
        self.value(header, |d| d.read_value_bytes(header))
    }

    fn read_to_vec(&mut self, length: u32, _vec: &mut Vec<u8>) -> DecodeResult<()> {
        self.raw(length)
    }

    fn read_u32_to_vec(&mut self, length: u32, _vec: &mut Vec<u32>) -> DecodeResult<()> {
        self.raw(length)
    }

    fn read_to<W>(&mut self, length: u32, _out: W) -> DecodeResult<()>
    where
        Self: Sized,
        W: io::Write,
    {
        self.raw(length)
    }

    fn skip_bytes(&mut self, length: u32) -> DecodeResult<()> {
        self.raw(length)
    }

    fn seek(&mut self, position: u64) -> DecodeResult<()>
    where
        Self::Reader: Seek,
    {
        self.inner.seek(position)
    }

    fn position(&self) -> u64 {
        self.inner.position()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_transfer_syntax_registry::entries::{
        EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
    };

    fn explicit() -> TransferSyntax {
        EXPLICIT_VR_LITTLE_ENDIAN.erased()
    }

    fn implicit() -> TransferSyntax {
        IMPLICIT_VR_LITTLE_ENDIAN.erased()
    }

    /// Explicit VR LE element with a 2-byte length.
    fn short(group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&group.to_le_bytes());
        v.extend_from_slice(&elem.to_le_bytes());
        v.extend_from_slice(vr);
        v.extend_from_slice(&(value.len() as u16).to_le_bytes());
        v.extend_from_slice(value);
        v
    }

    /// Explicit VR LE element with a 4-byte length (OB, OW, SQ, UN, UT...), declared
    /// length `len` whatever the value holds.
    fn long(group: u16, elem: u16, vr: &[u8; 2], len: u32, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&group.to_le_bytes());
        v.extend_from_slice(&elem.to_le_bytes());
        v.extend_from_slice(vr);
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(value);
        v
    }

    /// Implicit VR LE element (also the form of item and delimiter headers).
    fn implicit_el(group: u16, elem: u16, len: u32, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&group.to_le_bytes());
        v.extend_from_slice(&elem.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(value);
        v
    }

    const UNDEFINED: u32 = 0xFFFF_FFFF;

    fn item(len: u32, value: &[u8]) -> Vec<u8> {
        implicit_el(0xFFFE, 0xE000, len, value)
    }
    fn item_end() -> Vec<u8> {
        implicit_el(0xFFFE, 0xE00D, 0, &[])
    }
    fn seq_end() -> Vec<u8> {
        implicit_el(0xFFFE, 0xE0DD, 0, &[])
    }

    fn head() -> Vec<u8> {
        let mut d = short(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0");
        d.extend(short(0x0008, 0x0018, b"UI", b"1.2.3.4\0"));
        d
    }

    fn err(bytes: &[u8], ts: &TransferSyntax) -> String {
        format!(
            "{:#}",
            check_bytes(bytes, ts).expect_err("should be refused")
        )
    }

    #[test]
    fn a_well_formed_data_set_passes() {
        // Defined-length and undefined-length sequences, nested items, a long value that
        // is skipped, and encapsulated pixel data with an offset table and two fragments.
        let mut d = head();
        let inner = short(0x0008, 0x0100, b"SH", b"T-D1");
        let mut sq = item(inner.len() as u32, &inner);
        sq.extend(item(UNDEFINED, &[inner.clone(), item_end()].concat()));
        d.extend(long(0x0008, 0x2218, b"SQ", sq.len() as u32, &sq));
        d.extend(long(0x0040, 0x0555, b"SQ", UNDEFINED, &[]));
        d.extend(item(UNDEFINED, &[]));
        d.extend(long(0x0040, 0xA730, b"SQ", UNDEFINED, &[]));
        d.extend(item(inner.len() as u32, &inner));
        d.extend(seq_end());
        d.extend(item_end());
        d.extend(seq_end());
        let big = vec![7u8; 200_000];
        d.extend(long(0x0009, 0x1010, b"OB", big.len() as u32, &big));
        d.extend(long(0x7FE0, 0x0010, b"OB", UNDEFINED, &[]));
        d.extend(item(4, &0u32.to_le_bytes()));
        d.extend(item(6, b"frame1"));
        d.extend(item(80_000, &vec![1u8; 80_000]));
        d.extend(seq_end());
        check_bytes(&d, &explicit()).unwrap();
    }

    #[test]
    fn a_value_longer_than_the_data_is_refused_at_once() {
        // The case found by tests/reliability/fuzz_network.py: OB declared ~2 GB, 4 bytes present.
        let mut d = head();
        let at = d.len();
        d.extend(long(0x7FE0, 0x0010, b"OB", 0x7FFF_FFFE, b"abcd"));
        let t = std::time::Instant::now();
        let e = err(&d, &explicit());
        assert!(t.elapsed().as_secs() < 1, "took {:?}", t.elapsed());
        assert!(
            e.contains(&format!(
                "element (7FE0,0010) OB at offset {at} of the data set declares 2147483646 bytes, but only 4 follow"
            )),
            "{e}"
        );
        // Short-length VRs too, and the last byte counts.
        let mut d = head();
        d.extend(short(0x0010, 0x0010, b"PN", b"Doe^John"));
        d.truncate(d.len() - 1);
        assert!(err(&d, &explicit()).contains("element (0010,0010) PN"));
    }

    #[test]
    fn sequences_and_items_must_end_inside_the_data() {
        let inner = short(0x0008, 0x0100, b"SH", b"T-D1");
        // Defined-length sequence longer than the data.
        let mut d = head();
        d.extend(long(
            0x0008,
            0x2218,
            b"SQ",
            1000,
            &item(inner.len() as u32, &inner),
        ));
        assert!(err(&d, &explicit()).contains("element (0008,2218) SQ"));
        // Item of an undefined-length sequence longer than the data.
        let mut d = head();
        d.extend(long(
            0x0008,
            0x2218,
            b"SQ",
            UNDEFINED,
            &item(0x7FFF_0000, &inner),
        ));
        assert!(err(&d, &explicit()).contains("item (FFFE,E000)"));
        // An element inside an item, past the end.
        let mut d = head();
        let bad = long(0x0009, 0x0010, b"UN", 0x1000_0000, b"xx");
        d.extend(long(
            0x0008,
            0x2218,
            b"SQ",
            UNDEFINED,
            &item(UNDEFINED, &bad),
        ));
        assert!(err(&d, &explicit()).contains("element (0009,0010) UN"));
    }

    #[test]
    fn encapsulated_fragments_must_end_inside_the_data() {
        let mut d = head();
        d.extend(long(0x7FE0, 0x0010, b"OB", UNDEFINED, &[]));
        d.extend(item(0, &[]));
        d.extend(item(0x4000_0000, b"jpeg"));
        assert!(
            err(&d, &explicit()).contains("item (FFFE,E000)"),
            "{}",
            err(&d, &explicit())
        );
    }

    #[test]
    fn implicit_vr_uses_the_dictionary_for_sequences() {
        // (0008,1115) is SQ in the dictionary: its defined-length item is walked into.
        let inner = implicit_el(0x0008, 0x1150, 0x7000_0000, b"1.2");
        let it = item(inner.len() as u32, &inner);
        let mut d = implicit_el(0x0008, 0x0018, 4, b"1.23");
        d.extend(implicit_el(0x0008, 0x1115, it.len() as u32, &it));
        let e = err(&d, &implicit());
        assert!(e.contains("element (0008,1150) UI"), "{e}");
        // The well-formed variant passes.
        let inner = implicit_el(0x0008, 0x1150, 4, b"1.23");
        let it = item(inner.len() as u32, &inner);
        let mut d = implicit_el(0x0008, 0x0018, 4, b"1.23");
        d.extend(implicit_el(0x0008, 0x1115, it.len() as u32, &it));
        d.extend(implicit_el(0x0010, 0x0010, 8, b"Doe^John"));
        check_bytes(&d, &implicit()).unwrap();
        // A plain element past the end.
        d.extend(implicit_el(0x0010, 0x0020, 0xFFFF_FFF0, b"ID"));
        assert!(err(&d, &implicit()).contains("element (0010,0020) LO"));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut d = head();
        for _ in 0..MAX_SEQUENCE_DEPTH + 1 {
            d.extend(long(0x0008, 0x2218, b"SQ", UNDEFINED, &[]));
            d.extend(item(UNDEFINED, &[]));
        }
        assert!(err(&d, &explicit()).contains("nested more than"));
    }

    #[test]
    fn files_deflated_and_not() {
        use dicom_object::InMemDicomObject;
        use std::io::Write;
        let obj = InMemDicomObject::read_dataset_with_ts(&head()[..], &explicit()).unwrap();
        let deflated = TransferSyntaxRegistry
            .get("1.2.840.10008.1.2.1.99")
            .unwrap();
        let mut ds = Vec::new();
        obj.write_dataset_with_ts(&mut ds, deflated).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"prefix--").unwrap();
        f.write_all(&ds).unwrap();
        drop(f);
        let len = check_file(&path, 8, "1.2.840.10008.1.2.1.99").unwrap();
        assert_eq!(len, head().len() as u64);
        // Not deflate at all: refused, not a panic.
        assert!(check_file(&path, 0, "1.2.840.10008.1.2.1.99").is_err());

        let mut bad = head();
        bad.extend(long(0x7FE0, 0x0010, b"OW", 0x7FFF_FFFE, b"abcd"));
        std::fs::write(&path, [&b"prefix--"[..], &bad].concat()).unwrap();
        let e = format!(
            "{:#}",
            check_file(&path, 8, "1.2.840.10008.1.2.1").unwrap_err()
        );
        assert!(e.contains("element (7FE0,0010) OW"), "{e}");
    }
}
