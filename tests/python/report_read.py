"""Reads DICOM result objects with pydicom; prints one JSON object per file (stdout).

    python3 report_read.py FILE...

Each object: the file meta, the patient / study / series attributes, and per kind what a
reader would look at (the SR's content tree as (concept meaning, value) pairs, the KOS's
referenced instances, the SC's pixel shape and Burned In Annotation). Exit 1 if a file
cannot be read.
"""

import json
import sys

import pydicom


def concept(item):
    seq = item.get("ConceptNameCodeSequence")
    return seq[0].CodeMeaning if seq else None


def value(item):
    vt = item.ValueType
    if vt == "TEXT":
        return item.TextValue
    if vt == "CODE":
        return item.ConceptCodeSequence[0].CodeMeaning
    if vt == "NUM":
        return float(item.MeasuredValueSequence[0].NumericValue)
    if vt == "UIDREF":
        return item.UID
    if vt == "IMAGE":
        return item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return None


def walk(items, out, depth=0):
    for item in items:
        out.append([depth, item.RelationshipType, item.ValueType, concept(item), value(item)])
        if "ContentSequence" in item:
            walk(item.ContentSequence, out, depth + 1)


def describe(path):
    ds = pydicom.dcmread(path)
    doc = {
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "media_sop_instance_uid": str(ds.file_meta.MediaStorageSOPInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "study_instance_uid": str(ds.StudyInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "modality": ds.Modality,
        "patient_name": str(ds.PatientName),
        "patient_id": ds.PatientID,
        "accession_number": ds.AccessionNumber,
        "study_date": ds.StudyDate,
    }
    if "ContentSequence" in ds:
        doc["title"] = concept(ds)
        tree = []
        walk(ds.ContentSequence, tree)
        doc["content"] = tree
        evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
        doc["evidence"] = [
            str(r.ReferencedSOPInstanceUID)
            for s in evidence.ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence
        ]
    if "PixelData" in ds:
        doc["pixels"] = list(ds.pixel_array.shape)
        doc["burned_in_annotation"] = ds.BurnedInAnnotation
    return doc


def main():
    for path in sys.argv[1:]:
        print(json.dumps(describe(path)))


if __name__ == "__main__":
    main()
